"""Baselines on tiny random-weight models: budgets, exact metric definitions, FLAP compensation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from pg_pruning_plugin import SearchSpace, UnitMasks, compute_metric, load_pruned, masked, prune_model, save_pruned
from pg_pruning_plugin.compat.torch_pruning import dependency_graph
from pg_pruning_plugin.core.architectures import decoder_layers
from pg_pruning_plugin.core.selection import top_k_mask
from pg_pruning_plugin.scoring.baselines import (
    BASELINES,
    apply_biases,
    baseline_masks,
    block_influence_masks,
    flap_statistics,
    layer_influence_masks,
    select_units,
    taylor_scores,
)
from pg_pruning_plugin.scoring.metrics import BlockInfluence
from tests.helpers import tiny_model


def _batches(n: int = 2, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (4, 16), generator=g) for _ in range(n)]


def _kept_per_layer(mask: torch.Tensor, offsets: list[int]) -> list[int]:
    return [int(mask[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("kv_heads", [2, 8])
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_global_baselines_meet_the_budget_exactly(kv_heads, sparsity):
    model = tiny_model(num_key_value_heads=kv_heads)
    space = SearchSpace.from_model(model)
    cache: dict = {}
    for method in ("random", "magnitude", "flap", "taylor"):
        r = baseline_masks(model, method, sparsity, batches=_batches(), cache=cache, progress=False)
        assert r.structure == "global"
        for mask, offsets in ((r.masks.attn, space.attn_offsets), (r.masks.mlp, space.mlp_offsets)):
            n = offsets[-1]
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert int(mask.sum()) == n - int(n * sparsity), method  # the search's count
            assert min(_kept_per_layer(mask, offsets)) >= 1, method
    assert set(cache) == {"magnitude", "flap", "taylor"}


def test_random_depends_on_seed_only():
    model = tiny_model()
    a = baseline_masks(model, "random", 0.5, seed=1).masks
    b = baseline_masks(model, "random", 0.5, seed=1).masks
    c = baseline_masks(model, "random", 0.5, seed=2).masks
    assert torch.equal(a.mlp, b.mlp) and not torch.equal(a.mlp, c.mlp)


def test_wanda_sp_is_the_per_layer_top_k_of_the_metric():
    model = tiny_model()
    space = SearchSpace.from_model(model)
    batches = _batches()
    r = baseline_masks(model, "wanda-sp", 0.5, batches=batches, progress=False)
    metric = compute_metric(model, space, "wanda-sp", batches, keep_ratio=0.5, progress=False)
    assert torch.equal(r.masks.attn, top_k_mask(metric.attn, 0.5, space.attn_offsets, global_pool=False))
    assert torch.equal(r.masks.mlp, top_k_mask(metric.mlp, 0.5, space.mlp_offsets, global_pool=False))
    assert _kept_per_layer(r.masks.attn, space.attn_offsets) == [1, 1, 1]
    assert _kept_per_layer(r.masks.mlp, space.mlp_offsets) == [48, 48, 48]


def test_magnitude_equals_torch_pruning_group_magnitude():
    """MLP channels: Torch-Pruning's GroupMagnitudeImportance(p=2, sum, no normalizer) on the gate group."""
    model = tiny_model()
    space = SearchSpace.from_model(model)
    scores = baseline_masks(model, "magnitude", 0.5).scores
    graph = dependency_graph(model)
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    for i, layer in enumerate(decoder_layers(model)):
        group = graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, list(range(96)))
        torch.testing.assert_close(importance(group).double(), scores.mlp[space.mlp_slice(i)].double(),
                                   rtol=1e-5, atol=1e-6)


def test_taylor_is_weight_times_gradient_summed_per_unit():
    model = tiny_model()
    batches = _batches(3)
    scores = taylor_scores(model, batches, progress=False)
    layer = decoder_layers(model)[1]
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    weights = [getattr(layer.self_attn, n).weight for n in names] + [layer.mlp.gate_proj.weight,
                                                                     layer.mlp.up_proj.weight,
                                                                     layer.mlp.down_proj.weight]
    loss = sum(F.cross_entropy(model(input_ids=b).logits[:, :-1].reshape(-1, 200), b[:, 1:].reshape(-1))
               for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, weights)
    sal = [(w * g).abs().detach().double() for w, g in zip(weights, grads)]
    q, k, v, o, gate, up, down = sal
    # KV group 1 of layer 1: query heads 4..7 (n_rep=4, d=16), KV head 1, o_proj columns of those heads
    group1 = q[64:128].sum() + k[16:32].sum() + v[16:32].sum() + o[:, 64:128].sum()
    assert float(scores.attn[2 + 1]) == pytest.approx(float(group1), rel=1e-4)
    channel7 = gate[7].sum() + up[7].sum() + down[:, 7].sum()
    assert float(scores.mlp[96 + 7]) == pytest.approx(float(channel7), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_flap_scores_follow_the_definition():
    model = tiny_model()
    batches = _batches()
    r = baseline_masks(model, "flap", 0.5, batches=batches, progress=False)
    inputs = []
    handle = decoder_layers(model)[2].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    x = torch.cat(inputs)
    w = decoder_layers(model)[2].self_attn.o_proj.weight.double()
    metric = (x.var(0, unbiased=False) * w.pow(2).sum(0)) ** 2
    z = (metric - metric.mean()) / metric.std()
    torch.testing.assert_close(r.scores.attn[4:6].double(), z.view(2, -1).mean(1), rtol=1e-4, atol=1e-6)


def test_flap_bias_compensation_is_exact_at_the_mean_input(tmp_path):
    dense = tiny_model()
    batches = _batches()
    r = baseline_masks(dense, "flap", 0.5, batches=batches, progress=False)
    stats = flap_statistics(dense, batches, progress=False)
    space = SearchSpace.from_model(dense)
    pruned = prune_model(copy.deepcopy(dense), r.masks)
    apply_biases(pruned, r.biases)
    with torch.no_grad():
        for i, (d_layer, p_layer) in enumerate(zip(decoder_layers(dense), decoder_layers(pruned))):
            keep_o = r.masks.attn[space.attn_slice(i)].repeat_interleave(4 * 16).bool()
            keep_m = r.masks.mlp[space.mlp_slice(i)].bool()
            mean_o, mean_m = stats.o_mean[i].float(), stats.down_mean[i].float()
            torch.testing.assert_close(p_layer.self_attn.o_proj(mean_o[keep_o]), d_layer.self_attn.o_proj(mean_o),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p_layer.mlp.down_proj(mean_m[keep_m]), d_layer.mlp.down_proj(mean_m),
                                       rtol=1e-4, atol=1e-5)
            assert p_layer.mlp.down_proj.bias.abs().sum() > 0  # something was compensated

    ids = batches[0]
    compensated = copy.deepcopy(dense)
    apply_biases(compensated, r.biases)
    with torch.no_grad(), masked(compensated, space, UnitMasks(r.masks.attn, r.masks.mlp)):
        masked_logits = compensated(input_ids=ids).logits
    with torch.no_grad():
        pruned_logits = pruned(input_ids=ids).logits
        plain = prune_model(copy.deepcopy(dense), r.masks)(input_ids=ids).logits
    torch.testing.assert_close(pruned_logits, masked_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned_logits, plain, atol=1e-3)  # the biases change the output

    save_pruned(pruned, tmp_path / "flap")
    loaded = load_pruned(tmp_path / "flap")
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned_logits, rtol=1e-4, atol=1e-5)


def test_flap_joint_removes_the_prunable_parameter_fraction():
    model = tiny_model(num_key_value_heads=8)
    space = SearchSpace.from_model(model)
    r = baseline_masks(model, "flap-joint", 0.4, batches=_batches(), progress=False)
    assert r.structure == "AL-AM" and r.biases is not None
    kept = sum(space.params_per_attn_unit(i) * int(r.masks.attn[space.attn_slice(i)].sum())
               for i in range(space.num_layers)) + space.params_per_mlp_unit() * int(r.masks.mlp.sum())
    total = space.prunable_parameters()
    assert abs(kept - 0.6 * total) <= space.params_per_attn_unit(0)  # the closest prefix
    assert min(_kept_per_layer(r.masks.attn, space.attn_offsets)) >= 1


def test_uniform_structure_and_bad_input():
    model = tiny_model()
    space = SearchSpace.from_model(model)
    r = baseline_masks(model, "magnitude", 0.5, structure="uniform")
    assert _kept_per_layer(r.masks.mlp, space.mlp_offsets) == [48, 48, 48]
    with pytest.raises(ValueError, match="unknown baseline 'obd'.*taylor"):
        baseline_masks(model, "obd", 0.5)
    with pytest.raises(ValueError, match="needs calibration batches"):
        baseline_masks(model, "taylor", 0.5)
    with pytest.raises(ValueError, match="sparsity=1.0 must be in"):
        baseline_masks(model, "random", 1.0)
    with pytest.raises(ValueError, match="fewer than one per layer"):
        baseline_masks(model, "random", 0.7)
    with pytest.raises(ValueError, match="unknown structure"):
        select_units(r.scores, space, 0.5, 0.5, "blockwise")
    assert set(BASELINES) >= {"random", "magnitude", "wanda-sp", "flap", "taylor"}


def test_block_influence_baselines_remove_the_least_influential_blocks(llama):
    space = SearchSpace.from_model(llama)
    influence = BlockInfluence(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.05, 0.4, 0.3]),
                               torch.tensor([0.5, 0.2, 0.6]))
    masks = block_influence_masks(influence, space, removed_attn=2, removed_mlp=1)
    assert masks.attn_blocks.tolist() == [1, 0, 0] and masks.mlp_blocks.tolist() == [0, 1, 1]
    whole = layer_influence_masks(influence, space, 1)
    assert whole.attn_blocks.tolist() == whole.mlp_blocks.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="one layer must stay"):
        layer_influence_masks(influence, space, 3)
