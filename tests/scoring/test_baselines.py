"""Baselines on tiny random-weight models: the parameter budget of every method, exact metric definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from pg_pruning_plugin import SearchSpace, compute_metric
from pg_pruning_plugin.compat.torch_pruning import dependency_graph
from pg_pruning_plugin.core.architectures import ARCHITECTURES, LayerShape, decoder_layers
from pg_pruning_plugin.core.removal import kept_space
from pg_pruning_plugin.core.selection import removed_count, top_k_mask
from pg_pruning_plugin.core.units import UnitValues
from pg_pruning_plugin.scoring.baselines import (
    BASELINES,
    PARAM_MATCHED,
    STRUCTURES,
    baseline_masks,
    block_influence_masks,
    layer_influence_masks,
    per_layer_removed,
    select_joint,
    select_layers,
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


def _layer_removed(space: SearchSpace, masks: UnitValues, i: int) -> int:
    """Prunable parameters ``masks`` remove from layer ``i``."""
    layer = space.with_layers([space.layers[i]])
    one = UnitValues(masks.attn[space.attn_slice(i)], masks.mlp[space.mlp_slice(i)])
    return layer.prunable_parameters() - kept_space(layer, one).prunable_parameters()


def check_budget(space: SearchSpace, structure: str, masks: UnitValues, sparsity: float) -> float:
    """Assert the parameter budget of ``structure`` (the tolerances of scoring/baselines.py); returns the
    removed fraction of the prunable parameters."""
    total = space.prunable_parameters()
    removed = total - kept_space(space, masks).prunable_parameters()
    c_ch = space.params_per_mlp_unit()
    target = sparsity * total
    if structure == "global":
        assert abs(removed - target) <= c_ch / 2 + 1e-6
        assert int(masks.attn.sum()) == space.num_attn_units - removed_count(space.num_attn_units, sparsity)
    elif structure == "per-layer":
        for i, shape in enumerate(space.layers):
            layer_target = sparsity * space.with_layers([shape]).prunable_parameters()
            assert abs(_layer_removed(space, masks, i) - layer_target) <= c_ch / 2 + 1e-6
            kept_kv = int(masks.attn[space.attn_slice(i)].sum())
            assert kept_kv == shape.num_kv_groups - removed_count(shape.num_kv_groups, sparsity)
    elif structure == "AL-AM":
        assert -1e-6 <= removed - target < c_ch
    elif structure == "layers":
        assert masks.has_blocks and torch.equal(masks.attn_blocks, masks.mlp_blocks)
        assert abs(removed - target) <= total / space.num_layers / 2 + 1e-6
    if not masks.has_blocks:
        assert min(_kept_per_layer(masks.attn, space.attn_offsets)) >= 1
        assert min(_kept_per_layer(masks.mlp, space.mlp_offsets)) >= 1
    return removed / total


@pytest.mark.parametrize("kv_heads", [2, 8])
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_every_parameter_matched_baseline_meets_the_budget(kv_heads, sparsity):
    model = tiny_model(num_key_value_heads=kv_heads)
    space = SearchSpace.from_model(model)
    cache: dict = {}
    for method in PARAM_MATCHED:
        r = baseline_masks(model, method, sparsity, batches=_batches(), cache=cache, progress=False)
        assert r.structure == STRUCTURES[method]
        for mask in r.masks.as_dict().values():
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert check_budget(space, r.structure, r.masks, sparsity) == pytest.approx(r.removed_fraction), method
    assert set(cache) == {"magnitude", "taylor", "flap", "block-influence", f"wanda-sp@{sparsity}"}


SMOLLM2 = SearchSpace(ARCHITECTURES["llama"], [LayerShape(3, 3, 64, 1536)] * 30, 576, "llama")


@pytest.mark.parametrize("sparsity, per_layer", [(0.2, 0.2001953), (0.3, 0.2998047), (0.5, 0.4998372)])
def test_achieved_fractions_on_smollm2_shapes(sparsity, per_layer):
    """SmolLM2-135M (30 layers, 3 KV groups of 294,912 and 1,536 channels of 1,728 parameters): global and
    layer removal exact, per layer within half a channel per layer, AL-AM within one channel."""
    space = SMOLLM2
    assert (space.params_per_attn_unit(0), space.params_per_mlp_unit()) == (294_912, 1_728)
    g = torch.Generator().manual_seed(0)
    scores = UnitValues(torch.rand(space.num_attn_units, generator=g), torch.rand(space.num_mlp_units, generator=g))
    influence = BlockInfluence(torch.rand(30, generator=g), torch.rand(30, generator=g), torch.rand(30, generator=g))
    masks = {"global": select_units(scores, space, sparsity, "global"),
             "per-layer": select_units(scores, space, sparsity, "per-layer"),
             "AL-AM": select_joint(scores, space, sparsity),
             "layers": select_layers(influence, space, sparsity)}
    achieved = {structure: check_budget(space, structure, m, sparsity) for structure, m in masks.items()}
    assert achieved["global"] == pytest.approx(sparsity, abs=1e-12)
    assert achieved["layers"] == pytest.approx(sparsity, abs=1e-12)
    assert achieved["per-layer"] == pytest.approx(per_layer, abs=1e-7)
    assert sparsity <= achieved["AL-AM"] < sparsity + 1_728 / space.prunable_parameters()
    assert per_layer_removed(space, sparsity)[0] == {0.2: (0, 410), 0.3: (0, 614), 0.5: (1, 853)}[sparsity]
    units = select_units(scores, space, 0.3, "per-layer-units")  # the authors' mask: no KV group at 30 %
    assert check_budget(space, "per-layer-units", units, 0.3) == 460 * 1_728 / 3_538_944  # int(1536 * 0.3) = 460


def test_random_depends_on_seed_only():
    model = tiny_model()
    a = baseline_masks(model, "random", 0.5, seed=1).masks
    b = baseline_masks(model, "random", 0.5, seed=1).masks
    c = baseline_masks(model, "random", 0.5, seed=2).masks
    assert torch.equal(a.mlp, b.mlp) and not torch.equal(a.mlp, c.mlp)


def test_wanda_sp_is_the_per_layer_top_k_of_the_metric_propagated_under_its_own_mask():
    model = tiny_model()
    space = SearchSpace.from_model(model)
    batches = _batches()
    cache: dict = {}
    r = baseline_masks(model, "wanda-sp", 0.3, batches=batches, cache=cache, progress=False)
    # per layer: int(2 * 0.3) = 0 KV groups, and 61 channels: nearest to 30 % of 38,912 parameters
    assert per_layer_removed(space, 0.3) == [(0, 61)] * 3
    metric = compute_metric(model, space, "wanda-sp", batches, keep_ratio=0.7, mlp_keep_ratio=1 - 61 / 96,
                            progress=False)
    assert torch.equal(r.scores.mlp, metric.mlp) and torch.equal(r.scores.attn, metric.attn)
    assert _kept_per_layer(r.masks.attn, space.attn_offsets) == [2, 2, 2]
    assert _kept_per_layer(r.masks.mlp, space.mlp_offsets) == [35, 35, 35]
    for i in range(3):
        sl = space.mlp_slice(i)
        assert torch.equal(r.masks.mlp[sl], top_k_mask(metric.mlp[sl], 35 / 96, [0, 96], global_pool=False))
    wide = baseline_masks(model, "wanda-sp-global", 0.3, batches=batches, cache=cache, progress=False)
    assert wide.reused_statistics and torch.equal(wide.scores.mlp, r.scores.mlp)
    units = baseline_masks(model, "wanda-sp-units", 0.3, batches=batches, progress=False)
    units_metric = compute_metric(model, space, "wanda-sp", batches, keep_ratio=0.7, progress=False)
    assert torch.equal(units.masks.mlp, top_k_mask(units_metric.mlp, 0.7, space.mlp_offsets, global_pool=False))
    assert units.removed_fraction < 0.3 and "wanda-sp-units" not in PARAM_MATCHED


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


def test_bad_input():
    model = tiny_model()
    space = SearchSpace.from_model(model)
    scores = baseline_masks(model, "magnitude", 0.5).scores
    with pytest.raises(ValueError, match="unknown baseline 'obd'.*taylor"):
        baseline_masks(model, "obd", 0.5)
    with pytest.raises(ValueError, match="needs calibration batches"):
        baseline_masks(model, "shortgpt", 0.5)
    with pytest.raises(ValueError, match="sparsity=1.0 must be in"):
        baseline_masks(model, "random", 1.0)
    with pytest.raises(ValueError, match="fewer than one per layer"):
        baseline_masks(model, "random", 0.7)
    with pytest.raises(ValueError, match="takes all of its 96 MLP channels"):
        select_units(scores, space, 0.95, "per-layer")
    with pytest.raises(ValueError, match="unknown structure"):
        select_units(scores, space, 0.5, "blockwise")
    assert set(BASELINES) >= {"random", "magnitude", "wanda-sp", "flap", "taylor", "shortgpt"}


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
