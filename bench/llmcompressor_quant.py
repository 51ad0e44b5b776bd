"""SmolLM2-135M: policy-gradient pruning alone vs pruning then GPTQ W4A16 (group 64), through llmcompressor,
each with and without the modifier's least-squares refit (docs/results/llmcompressor.md).

Runs four recipes with ``pg-prune recipe`` (one ``oneshot`` each, same search settings, data and seed,
so all prune the same units; each run's log goes to ``OUT/<name>.log``): {pruning alone, pruning then
GPTQ} x {``refit: none``, ``refit: lstsq``}, then measures for the dense model and every output:
held-out perplexity (wiki-vital eval split, 128-token windows, batch protocol), the size of the
checkpoint on disk, and the load time with ``pg_pruning_plugin.load_pruned`` (per-layer widths; fp32,
decompressing the int4 weights). Writes ``results.json`` (a record of rows) and ``results.md`` under
``--out``.

    python bench/llmcompressor_quant.py --steps 10 --num-samples 128 --eval-windows 256 --out runs/bench-llmc
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from _common import ResultFile, command_line, machine_lines, markdown_table, settings_of
from transformers import AutoTokenizer

from pg_pruning_plugin import load_pruned
from pg_pruning_plugin.cli import main as pg_prune
from pg_pruning_plugin.evaluation.perplexity import perplexity
from pg_pruning_plugin.reporting import REPORT_FILE
from pg_pruning_plugin.resources.files import write_atomic
from pg_pruning_plugin.resources.models import resolve_model_dir

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# Every run uses the default allocation search at 30 % of the prunable parameters (MLP widths in blocks of 64,
# which group 64 also needs) with the same seed: the quantization recipe's per-unit settings are replaced by
# pg_prune.yaml's. The runs differ only in the refit before removal and in whether GPTQ follows.
SAME_SEARCH_AS_PG_PRUNE_YAML = ["preset=allocation", "global_budget=true", "lr=20", "init_batches=16"]
VARIANTS = {
    "pg30": ("pg_prune.yaml", ["refit=lstsq"]),
    "pg30-norefit": ("pg_prune.yaml", ["refit=none"]),
    "pg30-w4a16-g64": ("pg_prune_gptq_w4a16_g64.yaml", [*SAME_SEARCH_AS_PG_PRUNE_YAML, "refit=lstsq"]),
    "pg30-norefit-w4a16-g64": ("pg_prune_gptq_w4a16_g64.yaml", [*SAME_SEARCH_AS_PG_PRUNE_YAML, "refit=none"]),
}


def recipe_arguments(recipe: str, overrides: list[str], args: argparse.Namespace, output: Path) -> list[str]:
    cmd = ["recipe", str(RECIPES / recipe), "--model", args.model, "--output", str(output), "--num-samples",
           str(args.num_samples), "--seq-len", str(args.seq_len), "--overwrite", "--set", f"steps={args.steps}"]
    return cmd + [x for o in overrides for x in ("--set", o)]


def run_logged(argv: list[str], log: Path) -> None:
    """``pg-prune ARGV`` in this process, its log records written to ``log``: the package's (logging) and
    llmcompressor's and the modifier's (loguru)."""
    import llmcompressor  # noqa: F401 - its first import reconfigures loguru, removing every sink
    from loguru import logger as loguru_logger

    handler = logging.FileHandler(log, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sink = loguru_logger.add(handler.stream, level="INFO", format="{time:HH:mm:ss} {level} {name}: {message}")
    try:
        if pg_prune(argv) != 0:
            raise RuntimeError(f"pg-prune {' '.join(argv)} failed; see {log}")
    finally:
        loguru_logger.remove(sink)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def disk_mib(path: Path) -> dict[str, float]:
    files = [p for p in path.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {"weights_mib": weights / 2**20, "total_mib": sum(p.stat().st_size for p in files) / 2**20}


def load_seconds(path: Path, repeats: int) -> tuple[list[float], torch.nn.Module]:
    times, model = [], None
    for _ in range(repeats):
        del model
        start = time.perf_counter()
        model = load_pruned(path, dtype=torch.float32)
        times.append(time.perf_counter() - start)
    return times, model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=10, help="search steps (pg_prune.yaml ships 100)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration blocks for the search, refit and GPTQ")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=256, help="held-out 128-token windows")
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="evaluate existing outputs instead of re-running the recipes")
    p.add_argument("--out", type=Path, required=True, help="folder for the outputs, results.json and results.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = ResultFile(args.out / "results.json", settings_of(args, "out", "reuse"), command_line(argv))

    runs = {}
    for name, (recipe, overrides) in VARIANTS.items():
        output = args.out / name
        cmd = recipe_arguments(recipe, overrides, args, output)
        runs[name] = {"command": " ".join(["pg-prune", *cmd]), "recipe": recipe}
        if args.reuse and (output / "config.json").is_file():
            continue
        start = time.perf_counter()
        run_logged(cmd, args.out / f"{name}.log")
        runs[name]["oneshot_seconds"] = time.perf_counter() - start

    dense_dir = Path(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    for name, path in ({"dense": dense_dir} | {n: args.out / n for n in VARIANTS}).items():
        times, model = load_seconds(path, args.load_repeats)
        ppl = perplexity(model, tokenizer, "wiki-vital", seq_len=128, max_windows=args.eval_windows)
        report = json.loads((path / REPORT_FILE).read_text()) if (path / REPORT_FILE).is_file() else {}
        results.add({
            "name": name, **runs.get(name, {}), **disk_mib(path), "load_seconds": times,
            "load_seconds_median": statistics.median(times), "ppl": ppl.ppl, "eval": str(ppl),
            "parameters": sum(t.numel() for t in model.state_dict().values()),
            "kept_per_layer": report.get("kept_per_layer"), "effective": report.get("effective"),
            "search_seconds": (report.get("search") or {}).get("seconds"),
            "refit": (report.get("refit") or {}).get("method"),
            "refit_seconds": (report.get("refit") or {}).get("seconds"),
        })
        del model
    rows = {r["name"]: r for r in results.rows}
    same = all(rows[n]["kept_per_layer"] == rows["pg30"]["kept_per_layer"] for n in VARIANTS)
    results.data["same_pruning_in_every_run"] = same
    results.save()
    table = markdown_table(["model", "refit", "held-out PPL", "weights on disk (MiB)", "checkpoint total (MiB)",
                            "load time (s, median)", "oneshot (s)"],
                           [[r["name"], r["refit"] or "-", f"{r['ppl']:.2f}", f"{r['weights_mib']:.1f}",
                             f"{r['total_mib']:.1f}", f"{r['load_seconds_median']:.2f}",
                             f"{r['oneshot_seconds']:.0f}" if r.get("oneshot_seconds") else "-"]
                            for r in results.rows])
    text = "\n".join([*table, "", f"{rows['dense']['eval']}; same pruning in every run: "
                      f"{results.data['same_pruning_in_every_run']}", *machine_lines(results.data["machine"])])
    write_atomic(args.out / "results.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
