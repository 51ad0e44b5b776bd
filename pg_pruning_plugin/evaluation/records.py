"""Measurement records: JSON files of rows that a run appends to and a later run resumes, with the
machine and versions they were measured on.

A record file holds ``settings`` (what must match for a resumed run to add rows to it), ``rows`` (one
dict per measurement), ``commands`` (every command that added rows), ``wall_seconds`` (summed over
those commands), ``machine`` (:func:`provenance` at the start of the latest command, plus
``load_average_end``) and whatever a command stores beside them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..resources.files import write_atomic

__all__ = ["ResultFile", "provenance"]


def _cpu_name() -> str:
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def provenance(device: torch.device | str = "cpu") -> dict:
    """The machine and versions a measurement runs on: CPU, cores, torch threads, the 1-minute load
    average now, the GPU (when ``device`` is one) and the versions of Python and the stack."""
    device = torch.device(device)
    stamp = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "load_average": os.getloadavg()[0],
             "versions": {"python": platform.python_version()} | {
                 name: _version(name) for name in ("torch", "transformers", "torch-pruning", "llmcompressor",
                                                   "lm_eval", "pg-pruning-plugin")}}
    if device.type == "cuda":
        stamp["gpu"] = torch.cuda.get_device_name(device)
    return stamp


class ResultFile:
    """A record file (module docstring) that this run adds rows to.

    ``resume``: an existing ``path`` is continued (its ``settings`` must equal ``settings``, else
    ``ValueError``); without it the file starts empty and is overwritten at the first save. ``free``: the
    settings a resumed run may change (they do not affect the rows already measured, e.g. what is
    measured next to them); their new values replace the recorded ones.
    Setting ``write`` to False keeps the rows in memory only (the ranks of a distributed run other than 0).
    """

    def __init__(self, path: str | os.PathLike, settings: dict, command: str, device: torch.device | str = "cpu",
                 resume: bool = False, free: Sequence[str] = ()):
        self.path, self.write = Path(path), True
        self.data: dict = {"settings": settings, "rows": []}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
            fixed = {k: v for k, v in self.data["settings"].items() if k not in free}
            if fixed != {k: v for k, v in settings.items() if k not in free}:
                raise ValueError(f"--resume: {self.path} was written with other settings {self.data['settings']}; "
                                 f"drop --resume or pass another file")
            self.data["settings"] = settings
        self.command = command
        self.machine = provenance(device)
        self._start, self._previous = time.perf_counter(), self.data.get("wall_seconds", 0.0)

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def has(self, **fields) -> bool:
        """Whether a row with these field values exists (a resumed run skips it)."""
        return any(all(row.get(k) == v for k, v in fields.items()) for row in self.rows)

    def add(self, row: dict) -> None:
        """Append ``row`` and save the file."""
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Write the file atomically (unless ``write`` is off); the command is recorded once it has added
        something."""
        if not self.write:
            return
        commands = self.data.setdefault("commands", [])
        if not commands or commands[-1] != self.command:
            commands.append(self.command)
        self.data["wall_seconds"] = self._previous + time.perf_counter() - self._start
        self.data["machine"] = self.machine | {"load_average_end": os.getloadavg()[0]}
        write_atomic(self.path, json.dumps(self.data, indent=1))
