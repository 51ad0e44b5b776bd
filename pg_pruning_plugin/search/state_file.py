"""The search-state file: what a search writes every ``checkpoint_every`` steps and resumes from.

The file holds the run's *signature* (the configuration, the layer shapes and the number of
calibration batches), the loop's state (a plain dict) and the seconds the run had spent when it was
written. It is read and checked here without a model, so a command can refuse a corrupt or
mismatched file before it loads any weights: :func:`read_state` raises :class:`ResumeError` naming
the file, and :func:`check_signature` names the field that differs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.architectures import SearchSpace
from ..resources.files import atomic_file
from .config import ResumeError, SearchConfig

__all__ = ["SavedState", "check_signature", "read_state", "signature", "write_state"]


@dataclass
class SavedState:
    """The content of a search-state file."""

    signature: dict
    state: dict  # the loop's state (SearchState.to_dict)
    seconds: float = 0.0  # search time spent up to this state (0 for files written before it was recorded)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def signature(config: SearchConfig, space: SearchSpace, num_batches: int) -> dict:
    """What must be equal for a state file to be resumed: the configuration (except
    ``checkpoint_every``), the layer shapes and the number of calibration batches."""
    return {
        "config": dataclasses.asdict(config) | {"checkpoint_every": None},
        "layers": [dataclasses.astuple(s) for s in space.layers],
        "num_batches": num_batches,
    }


def write_state(path: str | os.PathLike, signature: dict, state: dict, seconds: float) -> None:
    """Write a state file atomically (the previous one stays until the new one is complete)."""
    with atomic_file(path) as tmp:
        torch.save({"signature": signature, "state": state, "seconds": seconds}, tmp)


def read_state(path: str | os.PathLike) -> SavedState:
    """Read a state file; :class:`ResumeError` if it is missing, corrupt or not a search state."""
    path = Path(path)
    try:
        blob = torch.load(path, weights_only=False)
        saved = SavedState(blob["signature"], blob["state"], float(blob.get("seconds", 0.0)))
        saved.step  # noqa: B018 - a state without a step is not a search state
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise ResumeError(f"cannot read search state {path}: {reason}. Delete it to start over") from exc
    return saved


def check_signature(saved: SavedState, expected: dict, path: str | os.PathLike) -> None:
    """Raise :class:`ResumeError` unless ``saved`` was written by a run with the ``expected`` signature;
    the message names the first field that differs, with both values."""
    differences = _differences(saved.signature, expected)
    if not differences:
        return
    field, was, now = differences[0]
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    raise ResumeError(
        f"search state {path} was written for another model, calibration set or configuration: {field} was "
        f"{was}, this run has {now}{more}. Resume with the same model, calibration and options, or delete the "
        f"file to start over"
    )


def _differences(saved: dict, expected: dict) -> list[tuple[str, object, object]]:
    found = []
    saved_config, config = saved.get("config", {}), expected["config"]
    for key in sorted(set(saved_config) | set(config)):
        if saved_config.get(key) != config.get(key):
            found.append((key, saved_config.get(key), config.get(key)))
    layers, expected_layers = saved.get("layers", []), expected["layers"]
    if len(layers) != len(expected_layers):
        found.append(("the number of decoder layers", len(layers), len(expected_layers)))
    else:
        for i, (a, b) in enumerate(zip(layers, expected_layers)):
            if tuple(a) != tuple(b):
                found.append((f"the shape of layer {i} (KV groups, queries per group, head_dim, MLP channels)",
                              tuple(a), tuple(b)))
                break
    if saved.get("num_batches") != expected["num_batches"]:
        found.append(("the number of calibration batches", saved.get("num_batches"), expected["num_batches"]))
    return found
