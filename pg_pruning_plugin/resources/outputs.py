"""Where an output may go: never onto the input model or the caches, and onto an existing path only when asked.

Every command and every saving function checks its output with :func:`check_output` before any
expensive work. The input model is protected whatever ``overwrite`` says: an output may not be an
input path, lie inside an input directory, or contain an input (replacing it would delete the
input). The project's asset cache (:func:`~pg_pruning_plugin.resources.assets.cache_dir`: the
embedded model's plain copy, GGUF copies, token caches) and the Hugging Face Hub cache are protected
as a whole. A single-file input (a ``.gguf``) protects that file only, so an output beside it is fine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .assets import cache_dir

__all__ = ["check_output", "model_source"]


def _hub_cache() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def model_source(model) -> list[Path]:
    """The local path a loaded model was read from (``config._name_or_path``), if it is one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name).expanduser() if name else None
    return [path] if path is not None and path.exists() else []


def _protected(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    found = [(Path(p).expanduser().resolve(), f"the input model {Path(p).expanduser()}") for p in inputs]
    found += [(cache_dir(), "the pg-pruning-plugin cache (PG_PRUNING_CACHE)"),
              (_hub_cache(), "the Hugging Face Hub cache")]
    return [(path.resolve(), what) for path, what in found if path.exists()]


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 overwrite_hint: str = "overwrite=True") -> Path:
    """The resolved output ``path``, after refusing one that would clobber an input or a cache.

    ``inputs``: the input model's local paths (a directory, or a file and anything built from it). Raises
    ``ValueError`` when the output is, lies inside, or contains one of them or a cache (whatever
    ``overwrite`` says), and ``FileExistsError`` for an existing output without ``overwrite``; the message
    names ``overwrite_hint`` (``"--overwrite"`` on the command line).
    """
    out = Path(path).expanduser().resolve()
    for protected, what in _protected(inputs):
        if out == protected or protected in out.parents:
            raise ValueError(f"output {out} would be written into {what} ({protected}); choose an output "
                             f"outside it")
        if out in protected.parents and out.exists():
            raise ValueError(f"output {out} contains {what} ({protected}), which replacing it would delete; "
                             f"choose another output")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} exists; pass {overwrite_hint} to replace it or choose another path")
    return out
