"""What every experiment script in bench/ shares: the record file (JSON rows with resume), the machine
and version stamp, the memory probe, held-out perplexity of masks, and markdown helpers.

The stamp, the probe and the record file are the package's own (``pg_pruning_plugin.evaluation``), so
the installed ``pg-prune compare`` / ``pg-prune bench`` and these scripts record the same fields. Run a
script as ``python bench/<name>.py``; tests/bench/ imports and runs each one on a tiny model.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pg_pruning_plugin import SearchSpace, UnitMasks, UnitValues, masked
from pg_pruning_plugin.core.subnetwork import subnetwork
from pg_pruning_plugin.evaluation.perplexity import perplexity_on_blocks
from pg_pruning_plugin.evaluation.records import ResultFile, provenance
from pg_pruning_plugin.evaluation.speed import measured

__all__ = ["ResultFile", "command_line", "fmt", "machine_lines", "markdown_table", "masked_perplexity", "measured",
           "provenance", "settings_of"]


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python bench/<script>.py <args>``: how this run was started (``argv`` as given to ``main``)."""
    script = Path(sys.argv[0]).resolve()
    name = f"bench/{script.name}" if script.parent.name == "bench" else "bench/<script>.py"
    return shlex.join(["python", name, *(sys.argv[1:] if argv is None else argv)])


def settings_of(args, *exclude: str) -> dict:
    """The parsed arguments as JSON-able settings (paths as text), without ``exclude``."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in exclude}


def masked_perplexity(model: torch.nn.Module, space: SearchSpace, masks: UnitValues | UnitMasks,
                      blocks: torch.Tensor, execution: str = "mask") -> float:
    """Held-out perplexity of ``model`` under ``masks`` (the same logits as the physically pruned model),
    with the protocol of the window length: batch-mean CE over batches of 8 for <= 128 tokens, token-weighted
    over batches of ``8192 // T`` above (evaluation/perplexity.py)."""
    n = blocks.shape[1]
    with (subnetwork if execution == "gather" else masked)(model, space, masks):
        return perplexity_on_blocks(model, blocks, batch_size=8 if n <= 128 else max(1, 8192 // n),
                                    reduction="batch" if n <= 128 else "token", progress=False)[0]


def fmt(value, spec: str = ".2f") -> str:
    """``value`` formatted, or a dash when it is missing or NaN."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """Lines of a markdown table; ``align`` holds one ``l``/``r`` per column (default: all left)."""
    align = align or "l" * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _stamp(machine: dict) -> dict:
    """A machine stamp of :func:`provenance`; records of the earlier per-command stamps (``cpu_count`` and flat
    versions, or ``load_average_start``) are read into the same fields."""
    versions = machine.get("versions") or {"python": machine.get("python"), "torch": machine.get("torch"),
                                           "transformers": machine.get("transformers"),
                                           "torch-pruning": machine.get("torch_pruning")}
    return {"cpu": machine.get("cpu"), "cores": machine.get("cores", machine.get("cpu_count")),
            "torch_threads": machine.get("torch_threads"),
            "load_average": machine.get("load_average", machine.get("load_average_start")),
            "load_average_end": machine.get("load_average_end"), "gpu": machine.get("gpu"), "versions": versions}


def machine_lines(machine: dict) -> list[str]:
    """Two markdown lines, ``Machine: …`` and ``Versions: …``, for a stamp of :func:`provenance`."""
    m = _stamp(machine)
    load = f"1-min load average {fmt(m['load_average'], '.1f')} at the start"
    if m["load_average_end"] is not None:
        load += f", {m['load_average_end']:.1f} at the end"
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    versions = ", ".join(f"{name} {v}" for name, v in m["versions"].items() if v)
    return [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads{gpu}; {load}  ",
            f"Versions: {versions}"]


def notes_section(notes: Path | None) -> list[str]:
    """The lines of a hand-written ``--notes`` file under its heading (none without a file)."""
    if notes is None:
        return []
    return ["", "## Notes (written by hand, not produced by this command)", "", notes.read_text().strip()]


def run_or_render(args, run, render) -> int:
    """The ``main`` of a record-then-render script: ``--render-only`` writes ``args.out`` from ``args.json``;
    otherwise ``run(args)`` fills the record (a ``ResultFile``), rendered to ``args.out`` when given."""
    import json

    if args.render_only:
        render(json.loads(args.json.read_text()), args.out)
        return 0
    record = run(args)
    if args.out:
        render(record.data, args.out)
    return 0

