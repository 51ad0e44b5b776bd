"""pg-pruning-plugin: forward-only policy-gradient structural pruning of LLMs.

Core API::

    from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, prune_model, save_pruned, load_pruned
    result = PolicyGradientSearch(model, calibration_blocks, SearchConfig(sparsity=0.3, steps=500)).run()
    prune_model(model, result.masks)          # physically smaller, same logits as the masked model
    save_pruned(model, "out", tokenizer); load_pruned("out")

Importing the package is fast and quiet: the public names are imported on first use (PEP 562), and
neither Torch-Pruning nor llmcompressor is imported. The package arranges that
``PolicyGradientPruningModifier`` registers itself with llmcompressor's ``ModifierFactory`` as soon as
llmcompressor is imported, so YAML recipes can name it (docs/llmcompressor.md). The integrations
themselves are ``pg_pruning_plugin.integrations.torch_pruning`` and ``.llmcompressor``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .compat.llmcompressor import register_when_imported

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "ARCHITECTURES": ".core.architectures",
    "SearchSpace": ".core.architectures",
    "UnsupportedArchitectureError": ".core.architectures",
    "load_pruned": ".core.checkpoint",
    "save_pruned": ".core.checkpoint",
    "masked": ".core.masking",
    "prune_model": ".core.removal",
    "UnitMasks": ".core.units",
    "UnitScores": ".core.units",
    "UnitValues": ".core.units",
    "RefitReport": ".refit",
    "refit": ".refit",
    "load_model": ".resources.models",
    "calibration_blocks": ".resources.text",
    "METRICS": ".scoring.metrics",
    "compute_metric": ".scoring.metrics",
    "Budget": ".search.budget",
    "BudgetError": ".search.budget",
    "hard_masks": ".search.budget",
    "ResumeError": ".search.config",
    "SearchConfig": ".search.config",
    "SearchResult": ".search.config",
    "PolicyGradientSearch": ".search.loop",
}

__all__ = [
    "ARCHITECTURES",
    "METRICS",
    "Budget",
    "BudgetError",
    "PolicyGradientSearch",
    "RefitReport",
    "ResumeError",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "UnitMasks",
    "UnitScores",
    "UnitValues",
    "UnsupportedArchitectureError",
    "calibration_blocks",
    "compute_metric",
    "hard_masks",
    "load_model",
    "load_pruned",
    "masked",
    "prune_model",
    "refit",
    "save_pruned",
]

if TYPE_CHECKING:
    from .core.architectures import ARCHITECTURES, SearchSpace, UnsupportedArchitectureError
    from .core.checkpoint import load_pruned, save_pruned
    from .core.masking import masked
    from .core.removal import prune_model
    from .core.units import UnitMasks, UnitScores, UnitValues
    from .refit import RefitReport, refit
    from .resources.models import load_model
    from .resources.text import calibration_blocks
    from .scoring.metrics import METRICS, compute_metric
    from .search.budget import Budget, BudgetError, hard_masks
    from .search.config import ResumeError, SearchConfig, SearchResult
    from .search.loop import PolicyGradientSearch


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """The package module: a subpackage imported later (``pg_pruning_plugin.refit``) does not rebind the public
    name it shares (the function ``refit``), as with an eager ``from .refit import refit``."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _PUBLIC and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


register_when_imported(f"{__name__}.integrations.llmcompressor.modifier")
