"""The budget: per-type projection, one cost budget (projection and final mask), the Budget object."""

import pytest
import torch

from pg_pruning_plugin import Budget, PolicyGradientSearch, SearchConfig, SearchSpace, UnitValues, hard_masks
from pg_pruning_plugin.core.architectures import count_parameters
from pg_pruning_plugin.core.selection import removed_count
from pg_pruning_plugin.search.budget import (
    BudgetError,
    CostBudget,
    TypeBudget,
    project_pools,
    project_to_budget,
    sparsity_for_parameters,
)
from pg_pruning_plugin.search.costs import cost_mask, expected_cost, project_to_cost, unit_costs
from tests.helpers import tiny_model


def _random_probs(space, blocks=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitValues(torch.rand(space.num_attn_units, generator=g), torch.rand(space.num_mlp_units, generator=g),
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
    probs = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([0.6, 0.95, 0.2, 0.85]))
    attn_block = float(costs.attn[space.attn_slice(0)].sum())
    mlp_block = float(costs.mlp[space.mlp_slice(0)].sum())
    total = 4 * (attn_block + mlp_block)
    mask = cost_mask(probs, costs, space, total - attn_block - mlp_block, ("attn_blocks", "mlp_blocks"))
    assert mask.attn_blocks.tolist() == [1, 0, 1, 1] and mask.mlp_blocks.tolist() == [1, 1, 0, 1]


def test_bad_budgets_are_refused_before_the_search(llama):
    blocks = torch.randint(0, 200, (32, 16))
    with pytest.raises(BudgetError, match="reachable: sparsity in"):
        PolicyGradientSearch(llama, blocks, SearchConfig(preset="authors",
                                                         sparsity=0.995, cost="params", steps=2, batch_size=4))
    with pytest.raises(BudgetError, match="fewer than 1 per layer"):
        PolicyGradientSearch(llama, blocks, SearchConfig(preset="authors", sparsity=0.9, steps=2, batch_size=4))
    with pytest.raises(ValueError, match="positive cost"):
        SearchConfig(preset="authors", cost="custom", custom_costs={"attn": 1.0, "mlp": 0.0})
    with pytest.raises(ValueError, match="positive cost"):
        SearchConfig(preset="authors", cost="custom", custom_costs={"attn": -3.0, "mlp": 1.0})
    with pytest.raises(ValueError, match="one ratio"):
        SearchConfig(preset="authors", cost="params", attn_sparsity=0.2)
    with pytest.raises(ValueError, match="global"):
        SearchConfig(preset="authors", granularity="depth", global_budget=False)
    with pytest.raises(ValueError, match="granularity"):
        SearchConfig(preset="authors", granularity="layers")




@pytest.mark.parametrize("seed", range(5))
def test_projection_meets_budget_within_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(500, generator=g) * 1.6 - 0.3
    budget = 0.4 * 500
    p = project_to_budget(s, budget)
    assert p.min() >= 0 and p.max() <= 1
    assert abs(float(p.sum()) - budget) < 1e-2
    # a uniform downward shift: order is preserved among unclamped entries
    inner = (p > 0) & (p < 1)
    torch.testing.assert_close(s[inner] - p[inner], torch.full_like(p[inner], float((s - p)[inner][0])))


def test_projection_never_shifts_up():
    s = torch.tensor([0.1, 0.2, 0.3])
    torch.testing.assert_close(project_to_budget(s, 2.0), s)


def test_per_layer_pools_each_meet_their_budget():
    s = torch.rand(30)
    p = project_pools(s * 2, 0.5, [0, 10, 30])
    assert abs(float(p[:10].sum()) - 5) < 1e-2 and abs(float(p[10:].sum()) - 10) < 1e-2


def test_one_count_rule():
    assert removed_count(90, 0.3) == 27  # not int(90 * 0.3) = 26
    assert removed_count(90, 1 - 0.7) == 27 and Budget.removed_count is removed_count


def test_budget_variants_and_what_they_report(llama):
    space = SearchSpace.from_model(llama)
    per_type = Budget.of(space, SearchConfig(preset="authors",
                                             attn_sparsity=0.5, mlp_sparsity=0.25, global_budget=False))
    assert isinstance(per_type, TypeBudget) and not per_type.global_pool and per_type.searched == ("attn", "mlp")
    assert per_type.initial_keep("attn") == 0.5 and per_type.initial_keep("mlp") == 0.75
    assert per_type.requested() == {"granularity": "width", "cost": None, "attn_sparsity": 0.5, "mlp_sparsity": 0.25,
                                    "global_budget": False}
    assert per_type.achieved(UnitValues.full(space, 1.0)) is None
    joint = Budget.of(space, SearchConfig(preset="authors", sparsity=0.36, granularity="width+depth"))
    assert isinstance(joint, CostBudget) and joint.global_pool
    assert joint.initial_keep("attn") == pytest.approx(0.8) == joint.initial_keep("mlp_blocks")  # sqrt(0.64)
    assert joint.requested()["kept_cost"] == pytest.approx(0.64 * space.prunable_parameters())
    probs = UnitValues.full(space, 0.9, blocks=True)
    masks = joint.hard_mask(probs)
    assert torch.equal(masks.mlp, hard_masks(probs, space, joint_config := SearchConfig(preset="authors", sparsity=0.36,
                                                                                      granularity="width+depth")).mlp)
    assert joint_config.cost == "params"
    achieved = joint.achieved(masks)
    assert achieved["kept"] <= achieved["requested_kept"] and achieved["dense"] == space.prunable_parameters()


def test_keep_params_is_resolved_by_the_budget(llama):
    space = SearchSpace.from_model(llama)
    total = count_parameters(llama)
    keep = total - 40_000
    config = SearchConfig(preset="authors", keep_params=keep, granularity="width+depth")
    assert config.cost == "params" and config.sparsity == 0.3  # the config is not rewritten
    budget = Budget.of(space, config)
    assert budget.requested()["cost_sparsity"] == pytest.approx(40_000 / space.prunable_parameters())
    assert budget.requested()["cost_sparsity"] == sparsity_for_parameters(llama, keep)
    assert budget.requested()["keep_params"] == keep
    with pytest.raises(BudgetError, match="never pruned"):
        Budget.of(space, SearchConfig(preset="authors", keep_params=10))
    with pytest.raises(ValueError, match="parameter budget"):
        SearchConfig(preset="authors", keep_params=keep, cost="flops")
    config = SearchConfig(preset="authors", keep_params=keep, steps=2, batch_size=4, init_batches=1)
    result = PolicyGradientSearch(llama, torch.randint(0, 200, (8, 16)), config).run(progress=False)
    kept = space.fixed_parameters + expected_cost(result.masks, unit_costs(space, "params"), space)
    assert kept <= keep


def test_removed_fractions_for_a_pruner_that_ranks_some_layers(llama):
    space = SearchSpace.from_model(llama)
    per_type = Budget.of(space, SearchConfig(preset="authors", attn_sparsity=0.5, mlp_sparsity=0.25))
    masks = UnitValues(torch.tensor([1.0, 0, 1, 1, 0, 0]), torch.ones(space.num_mlp_units))
    pools = {"attn": [0, 1], "mlp": [2]}
    assert per_type.removed_fractions(masks, pools) == {"attn": 0.5, "mlp": 0.25}
    cost = Budget.of(space, SearchConfig(preset="authors", sparsity=0.2, cost="params"))
    assert cost.removed_fractions(masks, pools) == {"attn": 0.25, "mlp": 0.0}  # what the masks remove there
