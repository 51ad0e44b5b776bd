"""llmcompressor integration: ``PolicyGradientPruningModifier`` for YAML recipes and Python recipe lists.

Importing this package imports llmcompressor and registers the modifier with its ``ModifierFactory``.
``import pg_pruning_plugin`` alone does not import llmcompressor; it registers the modifier as soon as
llmcompressor is imported (``pg_pruning_plugin/compat/llmcompressor.py``).
"""

from ...compat.llmcompressor import write_pruned_config
from .calibration import search_batches
from .modifier import PolicyGradientPruningModifier, RecipeOrderError
from .widths import quantizable_masks

__all__ = ["PolicyGradientPruningModifier", "RecipeOrderError", "quantizable_masks", "search_batches",
           "write_pruned_config"]
