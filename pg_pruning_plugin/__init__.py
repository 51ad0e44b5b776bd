"""pg-pruning-plugin: forward-only policy-gradient structural pruning of LLMs.

Core API::

    from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, prune_model, save_pruned, load_pruned
    result = PolicyGradientSearch(model, calibration_blocks, SearchConfig(sparsity=0.3, steps=500)).run()
    prune_model(model, result.masks)          # physically smaller, same logits as the masked model
    save_pruned(model, "out", tokenizer); load_pruned("out")

Importing the package also registers ``PolicyGradientPruningModifier`` with llmcompressor's
``ModifierFactory`` when llmcompressor is installed, so YAML recipes can name it.
"""

from .core.architectures import ARCHITECTURES, SearchSpace, UnsupportedArchitectureError
from .core.checkpoint import load_pruned, save_pruned
from .core.masking import UnitMasks, masked
from .scoring.metrics import METRICS, UnitScores, compute_metric
from .core.removal import prune_model
from .search.loop import PolicyGradientSearch, ResumeError, SearchConfig, SearchResult, hard_masks

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "METRICS",
    "PolicyGradientSearch",
    "ResumeError",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "UnitMasks",
    "UnitScores",
    "UnsupportedArchitectureError",
    "compute_metric",
    "hard_masks",
    "load_pruned",
    "masked",
    "prune_model",
    "save_pruned",
]

try:  # registers PolicyGradientPruningModifier with llmcompressor, so YAML recipes can name it
    from .integrations import llmcompressor as _llmcompressor  # noqa: F401
except ModuleNotFoundError as _exc:  # llmcompressor not installed: the core works without it
    if _exc.name not in ("llmcompressor", "compressed_tensors"):
        raise
