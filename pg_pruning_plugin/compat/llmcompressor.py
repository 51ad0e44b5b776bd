"""Workarounds for llmcompressor 0.14 (docs/llmcompressor.md), numbered as there.

1. **Registration.** llmcompressor finds a recipe's modifier only in its ``ModifierFactory``
   registry (no entry points, no dotted paths), and importing llmcompressor costs seconds and
   prints a warning on machines without a GPU. :func:`register_when_imported` therefore makes the
   modifier module import itself (and register) right after llmcompressor is imported, so
   ``import pg_pruning_plugin`` is enough before a YAML recipe names the modifier, without
   importing llmcompressor itself.
2. **The saved config.** llmcompressor 0.14 rewrites ``config.json`` from the original checkpoint on
   save, which reverts the pruned widths and layer count. :func:`patch_save_pretrained` wraps the
   model's ``save_pretrained`` so that :func:`write_pruned_config` writes them back (and extra files
   next to them). The same wrapper refuses, before anything is written, a save into the model's
   own source directory or the caches (``oneshot(output_dir=...)`` writes in place, without asking).

This module imports nothing from llmcompressor.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

from ..resources.files import write_atomic
from ..resources.outputs import check_output, model_source

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["PRUNED_CONFIG_KEYS", "patch_save_pretrained", "register_when_imported", "write_pruned_config"]

# Config keys pruning changes; written back after every save (num_hidden_layers and layer_types shrink when
# whole layers are deleted).
PRUNED_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "pruned_layers",
                      "num_hidden_layers", "layer_types")

_HOST = "llmcompressor"


# -- 1. registration ---------------------------------------------------------------------------------
class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds llmcompressor through the other finders and makes its loader import ``module`` right after it."""

    def __init__(self, module: str):
        self.module = module
        self._searching = False

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOST or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders (this one answers None meanwhile)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module(self.module)

        spec.loader.exec_module = exec_module  # this spec's loader only; it keeps every other method
        return spec


def register_when_imported(module: str) -> None:
    """Import ``module`` (which registers the modifier) as soon as llmcompressor is imported; at once if
    it already is. Without llmcompressor installed nothing ever happens."""
    if _HOST in sys.modules:
        importlib.import_module(module)
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module))


# -- 2. the saved config -----------------------------------------------------------------------------
def write_pruned_config(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Rewrite the pruned-shape keys of ``save_directory/config.json`` from ``model``'s in-memory config."""
    path = Path(save_directory) / "config.json"
    saved = json.loads(path.read_text())
    target = saved.get("text_config", saved)
    config = model.config.get_text_config()
    target.update({key: getattr(config, key) for key in PRUNED_CONFIG_KEYS if getattr(config, key, None) is not None})
    write_atomic(path, json.dumps(saved, indent=2, sort_keys=True))


def patch_save_pretrained(model: nn.Module, extra_files: Callable[[], dict[str, str]]) -> None:
    """Wrap ``model.save_pretrained`` once so that every save writes the pruned config keys back and the
    files ``extra_files()`` names (file name -> text) next to ``config.json``. A save into the directory the
    model was loaded from (or the caches) raises ``ValueError`` before anything is written."""
    inner = model.save_pretrained
    if getattr(inner, "_pg_pruning_config_patch", False):
        return
    sources = model_source(model)

    @wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        check_output(save_directory, overwrite=True, inputs=sources)
        inner(save_directory, *args, **kwargs)
        write_pruned_config(model, save_directory)
        for name, text in extra_files().items():
            write_atomic(Path(save_directory) / name, text)

    save_pretrained._overridden = True  # llmcompressor's marker: it must not wrap this method again
    save_pretrained._pg_pruning_config_patch = True
    model.save_pretrained = save_pretrained
