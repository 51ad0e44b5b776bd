"""Masked forward passes: the all-ones mask is the dense forward, a mask equals zeroed weights."""

import pytest
import torch

from pg_pruning_plugin import SearchSpace, UnitMasks, masked
from tests.helpers import ARCH_CASES, random_masks, tiny_model


def _blocks(n=32, t=16, seed=0):
    return torch.randint(0, 200, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES)
def test_all_ones_mask_reproduces_dense_logits_exactly(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    ids = _blocks(4)
    with torch.no_grad():
        dense = model(ids).logits
        with masked(model, space, UnitMasks.ones(space)):
            ones = model(ids).logits
            hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert torch.equal(dense, ones)
    assert hooks == 0  # nothing to mask, nothing added to the forward


def test_only_blocks_that_drop_units_get_a_hook(llama):
    space = SearchSpace.from_model(llama)
    masks = UnitMasks.ones(space)
    masks.mlp[0, space.mlp_offsets[1]] = 0
    with masked(llama, space, masks):
        hooked = [name for name, m in llama.named_modules() if m._forward_pre_hooks]
    assert hooked == ["model.layers.1.mlp.down_proj"]


def test_mask_equals_zeroed_weights(llama):
    space = SearchSpace.from_model(llama)
    masks = random_masks(space)
    ids = _blocks(2)
    with torch.no_grad(), masked(llama, space, UnitMasks(masks.attn, masks.mlp)):
        via_hooks = llama(ids).logits
    with torch.no_grad(), masked(llama, space, masks):  # one UnitValues sample works the same
        assert torch.equal(llama(ids).logits, via_hooks)
    spec = space.spec
    for i, layer in enumerate(llama.model.layers):
        shape = space.layers[i]
        cols = masks.attn[space.attn_slice(i)].repeat_interleave(shape.queries_per_group * shape.head_dim)
        getattr(layer.self_attn, spec.o).weight.data *= cols
        getattr(layer.mlp, spec.down).weight.data *= masks.mlp[space.mlp_slice(i)]
    with torch.no_grad():
        torch.testing.assert_close(via_hooks, llama(ids).logits)
