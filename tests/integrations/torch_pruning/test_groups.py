"""Torch-Pruning couples exactly what the core engine removes, on every supported family.

The core removes units by slicing (core/removal.py, core/slicing.py) without Torch-Pruning. This test
keeps the two in step: for one KV group and one MLP channel of every layer, the group Torch-Pruning's
dependency graph builds holds exactly the Linear members and channels of ``core.slicing.UNIT_AXES``.
"""

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from pg_pruning_plugin import SearchSpace
from pg_pruning_plugin.core.architectures import decoder_layers
from pg_pruning_plugin.core.slicing import UNIT_AXES, kept_indices
from pg_pruning_plugin.integrations.torch_pruning import PolicyGradientImportance, dependency_graph
from tests.helpers import ARCH_CASES, ARCH_IDS, synthetic_result, tiny_model

_HANDLERS = {0: "prune_out_channels", 1: "prune_in_channels"}


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_torch_pruning_couples_exactly_what_the_core_removes(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    spec, graph = space.spec, dependency_graph(model)
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    for i, (layer, shape) in enumerate(zip(decoder_layers(model), space.layers)):
        for kind, root, prune_fn, unit in (("attn", "o", tp.prune_linear_in_channels, shape.num_kv_groups - 1),
                                           ("mlp", "gate", tp.prune_linear_out_channels, 5)):
            unit_index = torch.tensor([unit])
            index = kept_indices(shape, unit_index if kind == "attn" else None, unit_index if kind == "mlp" else None)
            expected = {getattr(getattr(layer, spec.block_of(role)), getattr(spec, role)): (_HANDLERS[dim],
                                                                                            set(index[k].tolist()))
                        for role, (k, dim) in UNIT_AXES.items() if k in index}
            root_linear = getattr(getattr(layer, spec.block_of(root)), getattr(spec, root))
            group = graph.get_pruning_group(root_linear, prune_fn, sorted(expected[root_linear][1]))
            got = {dep.target.module: (dep.handler.__name__, {int(c) for c in idxs})
                   for dep, idxs in group if isinstance(dep.target.module, nn.Linear)}
            assert got == expected, (i, kind)
            assert importance.classify(group) == (kind, i)  # the plugin's own layout check agrees
