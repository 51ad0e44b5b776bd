"""Sub-network execution (gathered kept weights) against the masked-multiply path, on every family."""

from __future__ import annotations

import pytest
import torch

from pg_pruning_plugin import SearchSpace, UnitMasks, masked
from pg_pruning_plugin.core.subnetwork import subnetwork
from pg_pruning_plugin.evaluation.speed import bernoulli_masks
from tests.helpers import ARCH_CASES, tiny_model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _edge_masks(space: SearchSpace) -> UnitMasks:
    """Layer 0 keeps no KV group, layer 1 no MLP channel, layer 2 everything; the rest is mixed."""
    masks = bernoulli_masks(space, 0.5, 1, seed=3)
    masks.attn[0, space.attn_slice(0)] = 0
    masks.mlp[0, space.mlp_slice(1)] = 0
    masks.attn[0, space.attn_slice(2)] = 1
    masks.mlp[0, space.mlp_slice(2)] = 1
    masks.attn[0, space.attn_offsets[1]] = 0  # a partly kept attention block
    masks.attn[0, space.attn_offsets[1] + 1] = 1
    return masks


ALL_CASES = ARCH_CASES + [("llama", {"attention_bias": True, "mlp_bias": True})]  # o/down biases too


@pytest.mark.parametrize("model_type,overrides", ALL_CASES,
                         ids=[t + "".join(f"-{k}" for k in o) for t, o in ALL_CASES])
def test_gather_equals_masked_and_restores_the_model(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    before = _state(model)
    params_before = dict(model.named_parameters())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = model(ids).logits
    for masks in (_edge_masks(space), bernoulli_masks(space, 0.5, 1, seed=7), UnitMasks.ones(space)):
        with torch.no_grad():
            with masked(model, space, masks):
                reference = model(ids).logits
            with subnetwork(model, space, masks):
                gathered = model(ids).logits
        torch.testing.assert_close(gathered, reference, rtol=1e-5, atol=1e-5)
        if masks.attn.sum() < space.num_attn_units:
            assert (gathered - dense).abs().max() > 1e-3  # the masks do remove something
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())
    torch.testing.assert_close(model(ids).logits, dense)


def test_weights_are_narrow_inside_and_restored_after_an_error(llama):
    space = SearchSpace.from_model(llama)
    masks = _edge_masks(space)
    q1 = llama.model.layers[1].self_attn.q_proj
    seen = []
    handle = q1.register_forward_hook(lambda mod, args, out: seen.append(tuple(mod.weight.shape)))
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad(), subnetwork(llama, space, masks):
        llama(ids)
    kept = int(masks.attn[0, space.attn_slice(1)].sum())
    assert seen == [(kept * 4 * 16, 64)]  # n_rep 4, head_dim 16
    assert q1.weight.shape == (128, 64)

    before = _state(llama)
    boom = llama.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: 1 / 0)  # mid-swap
    with pytest.raises(ZeroDivisionError), torch.no_grad(), subnetwork(llama, space, masks):
        llama(ids)
    boom.remove()
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in _state(llama).items())
    assert llama.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert llama.model.layers[1].self_attn.o_proj.weight.shape == (64, 128)
    assert "forward" not in llama.model.layers[0].self_attn.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())


def test_rejects_several_samples_and_soft_masks(llama):
    space = SearchSpace.from_model(llama)
    with pytest.raises(ValueError, match="one mask sample"), subnetwork(llama, space, UnitMasks.ones(space, 2)):
        pass
    soft = UnitMasks.ones(space)
    soft.mlp[0, 3] = 0.5
    with pytest.raises(ValueError, match="0/1"), subnetwork(llama, space, soft):
        pass
