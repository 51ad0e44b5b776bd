"""Layer (block) units and one cost budget: projection, final mask, removal, checkpoints, search."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_pruning_plugin import (PolicyGradientSearch, SearchConfig, SearchResult, SearchSpace, UnitMasks, UnitScores,
                               load_pruned, masked, prune_model, save_pruned)
from pg_pruning_plugin.search.budget import (BudgetError, budget_accounting, cost_mask, expected_cost, format_accounting,
                                      project_to_cost, unit_costs)
from pg_pruning_plugin.scoring.metrics import block_influence
from pg_pruning_plugin.core.removal import RemovedAttention, RemovedMLP
from tests.tiny_models import ARCH_CASES, tiny_model


def _block_masks(space: SearchSpace) -> UnitScores:
    """Layer 0 loses its attention, layer 1 both blocks (it disappears), layer 2 its MLP; plus some widths."""
    masks = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]))
    masks.mlp[space.mlp_offsets[0] + 5] = 0
    masks.attn[space.attn_offsets[2]] = 0
    return masks


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(ARCH_CASES)])
def test_removed_blocks_match_masked_logits_generate_and_reload(model_type, overrides, tmp_path):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    masks = _block_masks(space)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, space, UnitMasks(**masks.as_dict())):
        expected = model(ids).logits
        expected_tokens = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
    prune_model(model, masks)
    assert model.config.num_hidden_layers == 2
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, RemovedAttention) and isinstance(layers[1].mlp, RemovedMLP)
    assert not any("layers.1.mlp" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False), expected_tokens)
    save_pruned(model, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_whole_layer_removal_gives_a_stock_checkpoint(tmp_path):
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    keep_middle = torch.tensor([1.0, 0.0, 1.0])
    masks = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units), keep_middle, keep_middle.clone())
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad(), masked(model, space, UnitMasks(**masks.as_dict())):
        expected = model(ids).logits
    prune_model(model, masks)
    save_pruned(model, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no plugin class involved
    assert stock.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, expected, atol=1e-5, rtol=1e-5)


def _random_probs(space, blocks=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitScores(torch.rand(space.num_attn_units, generator=g), torch.rand(space.num_mlp_units, generator=g),
                      torch.rand(space.num_layers, generator=g) if blocks else None,
                      torch.rand(space.num_layers, generator=g) if blocks else None)


@pytest.mark.parametrize("searched", [("attn", "mlp"), ("attn_blocks", "mlp_blocks"),
                                      ("attn", "mlp", "attn_blocks", "mlp_blocks")])
@pytest.mark.parametrize("cost", ["params", "flops"])
def test_cost_projection_meets_the_budget_and_only_moves_down(llama, searched, cost):
    space = SearchSpace.from_model(llama)
    costs = unit_costs(space, cost, seq_len=128)
    probs = _random_probs(space)
    if "attn" not in searched:
        probs.attn, probs.mlp = torch.ones_like(probs.attn), torch.ones_like(probs.mlp)
    if "attn_blocks" not in searched:
        probs.attn_blocks = probs.mlp_blocks = None
    budget = 0.5 * expected_cost(probs, costs, space)
    projected = project_to_cost(probs, costs, space, budget, searched)
    assert expected_cost(projected, costs, space) == pytest.approx(budget, rel=1e-6)
    for name, value in projected.as_dict().items():
        before = probs.as_dict()[name]
        assert value.min() >= 0 and value.max() <= 1
        assert (value <= before + 1e-6).all()
        if name not in searched:
            assert torch.equal(value, before)
    low = project_to_cost(projected, costs, space, 10 * budget, searched)  # already within: only clamped
    assert torch.allclose(low.attn, projected.attn)


@pytest.mark.parametrize("searched", [("attn", "mlp"), ("attn_blocks", "mlp_blocks"),
                                      ("attn", "mlp", "attn_blocks", "mlp_blocks")])
def test_cost_mask_fits_the_budget_and_keeps_the_model_usable(searched):
    model = tiny_model("llama", num_hidden_layers=6)
    space = SearchSpace.from_model(model)
    costs = unit_costs(space, "params")
    total = float(costs.attn.sum() + costs.mlp.sum())
    for keep in (0.8, 0.5, 0.3):  # 0.3 is near the width floor: one KV group per layer
        probs = _random_probs(space, seed=int(keep * 10))
        mask = cost_mask(probs, costs, space, keep * total, searched)
        kept = expected_cost(mask, costs, space)
        assert kept <= keep * total
        if searched == ("attn", "mlp"):  # fine-grained units: within one unit of the budget
            assert keep * total - kept < float(costs.attn.max())
        attn_blocks = mask.attn_blocks if mask.has_blocks else torch.ones(space.num_layers)
        mlp_blocks = mask.mlp_blocks if mask.has_blocks else torch.ones(space.num_layers)
        assert (attn_blocks + mlp_blocks).sum() >= 1
        for i in range(space.num_layers):
            if attn_blocks[i]:
                assert mask.attn[space.attn_slice(i)].sum() >= 1
            if mlp_blocks[i]:
                assert mask.mlp[space.mlp_slice(i)].sum() >= 1


def test_cost_mask_drops_the_least_probable_blocks():
    model = tiny_model("llama", num_hidden_layers=4)
    space = SearchSpace.from_model(model)
    costs = unit_costs(space, "params")
    probs = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([0.6, 0.95, 0.2, 0.85]))
    attn_block = float(costs.attn[space.attn_slice(0)].sum())
    mlp_block = float(costs.mlp[space.mlp_slice(0)].sum())
    total = 4 * (attn_block + mlp_block)
    mask = cost_mask(probs, costs, space, total - attn_block - mlp_block, ("attn_blocks", "mlp_blocks"))
    assert mask.attn_blocks.tolist() == [1, 0, 1, 1] and mask.mlp_blocks.tolist() == [1, 1, 0, 1]


def test_search_with_blocks_runs_resumes_and_saves(llama, tmp_path):
    blocks = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(sparsity=0.4, steps=6, batch_size=4, init_batches=2, granularity="width+depth",
                          checkpoint_every=3)
    assert config.cost == "params"  # depth granularities always use one budget
    full = PolicyGradientSearch(llama, blocks, config).run(progress=False)
    space = full.space
    costs = unit_costs(space, "params")
    total = float(costs.attn.sum() + costs.mlp.sum())
    assert expected_cost(full.probs, costs, space) <= 0.6 * total * (1 + 1e-6)  # the projection only moves down
    assert expected_cost(full.masks, costs, space) <= 0.6 * total
    state = tmp_path / "state.pt"

    def stop_at_3(step, search_state):
        if search_state["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PolicyGradientSearch(llama, blocks, config, checkpoint_path=state).run(progress=False, on_step=stop_at_3)
    resumed = PolicyGradientSearch(llama, blocks, config, checkpoint_path=state).run(progress=False)
    for name, value in full.masks.as_dict().items():
        assert torch.equal(value, resumed.masks.as_dict()[name])
    full.save(tmp_path / "result.pt")
    loaded = SearchResult.load(tmp_path / "result.pt")
    assert torch.equal(loaded.probs.attn_blocks, full.probs.attn_blocks)
    assert loaded.kept_per_layer() == full.kept_per_layer()
    acc = budget_accounting(space, full.masks, requested_params=0.6 * total)
    removed = sum(v["params"] for v in acc["removed_by"].values())
    assert acc["prunable_params"]["dense"] - acc["prunable_params"]["kept"] == pytest.approx(removed)
    table = format_accounting(acc)
    assert table.count("\n") == 3 + space.num_layers
    assert ("REMOVED" in table) == bool(acc["removed_by"]["blocks"]["params"])


def test_depth_search_only_moves_blocks(llama):
    blocks = torch.randint(0, 200, (32, 16), generator=torch.Generator().manual_seed(0))
    result = PolicyGradientSearch(llama, blocks, SearchConfig(sparsity=0.3, steps=4, batch_size=4, init_batches=2,
                                                              granularity="depth", init="constant")).run(progress=False)
    assert torch.equal(result.probs.attn, torch.ones_like(result.probs.attn))
    assert torch.equal(result.masks.mlp, torch.ones_like(result.masks.mlp))
    assert result.masks.attn_blocks.numel() == 3


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(ARCH_CASES)])
def test_block_influence_is_zero_for_a_block_that_changes_nothing(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    batches = [torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))]
    influence = block_influence(model, space, batches, progress=False)
    assert influence.attn.shape == influence.mlp.shape == influence.layer.shape == (3,)
    assert ((influence.attn > 0) & (influence.attn <= 2)).all()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    assert block_influence(model, space, batches, progress=False).mlp[1].abs() < 1e-6


def test_bad_budgets_are_refused_before_the_search(llama):
    blocks = torch.randint(0, 200, (32, 16))
    with pytest.raises(BudgetError, match="reachable: sparsity in"):
        PolicyGradientSearch(llama, blocks, SearchConfig(sparsity=0.995, cost="params", steps=2, batch_size=4))
    with pytest.raises(BudgetError, match="fewer than 1 per layer"):
        PolicyGradientSearch(llama, blocks, SearchConfig(sparsity=0.9, steps=2, batch_size=4))
    with pytest.raises(ValueError, match="positive cost"):
        SearchConfig(cost="custom", custom_costs={"attn": 1.0, "mlp": 0.0})
    with pytest.raises(ValueError, match="positive cost"):
        SearchConfig(cost="custom", custom_costs={"attn": -3.0, "mlp": 1.0})
    with pytest.raises(ValueError, match="one ratio"):
        SearchConfig(cost="params", attn_sparsity=0.2)
    with pytest.raises(ValueError, match="global"):
        SearchConfig(granularity="depth", global_budget=False)
    with pytest.raises(ValueError, match="granularity"):
        SearchConfig(granularity="layers")


def test_block_influence_baselines_remove_the_least_influential_blocks(llama):
    from pg_pruning_plugin.scoring.baselines import block_influence_masks, layer_influence_masks
    from pg_pruning_plugin.scoring.metrics import BlockInfluence

    space = SearchSpace.from_model(llama)
    influence = BlockInfluence(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.05, 0.4, 0.3]),
                               torch.tensor([0.5, 0.2, 0.6]))
    masks = block_influence_masks(influence, space, removed_attn=2, removed_mlp=1)
    assert masks.attn_blocks.tolist() == [1, 0, 0] and masks.mlp_blocks.tolist() == [0, 1, 1]
    whole = layer_influence_masks(influence, space, 1)
    assert whole.attn_blocks.tolist() == whole.mlp_blocks.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="one layer must stay"):
        layer_influence_masks(influence, space, 3)
