"""pg-pruning-plugin: forward-only policy-gradient structural pruning of LLMs.

Core API::

    from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, prune_model, save_pruned, load_pruned
    result = PolicyGradientSearch(model, calibration_blocks, SearchConfig(sparsity=0.3, steps=500)).run()
    prune_model(model, result.masks)          # physically smaller, same logits as the masked model
    save_pruned(model, "out", tokenizer); load_pruned("out")

Importing the package imports neither Torch-Pruning nor llmcompressor. It arranges that
``PolicyGradientPruningModifier`` registers itself with llmcompressor's ``ModifierFactory`` as soon as
llmcompressor is imported, so YAML recipes can name it (docs/llmcompressor.md). The integrations
themselves are ``pg_pruning_plugin.integrations.torch_pruning`` and ``.llmcompressor``.
"""

from .compat.llmcompressor import register_when_imported
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

__version__ = "0.1.0"

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

register_when_imported(f"{__name__}.integrations.llmcompressor.modifier")
