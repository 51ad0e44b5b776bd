"""Torch-Pruning plugin: learned keep-probabilities as a ``tp.importance.Importance``, and a pruner.

::

    import torch_pruning as tp
    from pg_pruning_plugin.integrations.torch_pruning import PolicyGradientImportance, build_pruner

    importance = PolicyGradientImportance(search_result, model)   # or a path written by SearchResult.save
    pruner = build_pruner(model, importance, attn_ratio=0.3, mlp_ratio=0.3,   # a tp.pruner.BasePruner
                          calibration=token_ids)   # [N, T]: the kept weights are refitted (least squares)
    pruner.step()                      # whole KV groups and MLP channels removed, config updated

A pruner built by hand, or as Torch-Pruning's LLM example builds one, prunes with
``prune_step(pruner, refit_with=StepRefit(calibration=token_ids))`` instead of its own ``step()``
(which the importance refuses before pruning).

``importance.py`` scores units and recognises Torch-Pruning's group layouts; ``ledger.py`` tracks
which units are still present; ``pruner.py`` plans ratios and runs the steps. The Torch-Pruning
1.6.1 workarounds they rely on are in ``pg_pruning_plugin/compat/torch_pruning.py``
(docs/torch_pruning.md numbers them); its tracing helpers and ``unwrapped_parameters`` are part of this
API.
"""

from ...compat.torch_pruning import (
    dependency_graph,
    kv_group_heads,
    tracing_inputs,
    tracing_mode,
    unwrapped_parameters,
)
from .importance import GroupLayoutError, PolicyGradientImportance
from .ledger import UnitLedger
from .pruner import PolicyGradientPruner, StepRefit, StepReport, build_pruner, prune_step

__all__ = [
    "GroupLayoutError",
    "PolicyGradientImportance",
    "PolicyGradientPruner",
    "StepRefit",
    "StepReport",
    "UnitLedger",
    "build_pruner",
    "dependency_graph",
    "kv_group_heads",
    "prune_step",
    "tracing_inputs",
    "tracing_mode",
    "unwrapped_parameters",
]
