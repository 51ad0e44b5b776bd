"""The allocation policy: transfers, the policy-gradient estimator, a toy problem, and the search on tiny models."""

from __future__ import annotations

import itertools

import pytest
import torch

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace
from pg_pruning_plugin.search.allocation import AllocationSpace, TransferPolicy, can_give, can_take
from pg_pruning_plugin.search.levels import LevelTable, level_prices, reference_levels
from tests.helpers import tiny_model

# A toy space: 3 layers, KV levels 1..3 at price 4, MLP levels 1..6 at price 1.
LOW = torch.ones(3, 2, dtype=torch.long)
HIGH = torch.tensor([[3, 6]] * 3)
PRICE = torch.tensor([[4, 1]] * 3)


def toy(budget: int) -> AllocationSpace:
    return AllocationSpace(LOW, HIGH, PRICE, budget)


def test_transfers_keep_the_budget_and_the_bands():
    levels = torch.tensor([[2, 3], [2, 3], [2, 3]])  # cost 3 * (8 + 3) = 33
    space = toy(budget=34)  # one unit of slack
    assert can_give(space, torch.tensor([[1, 1], [2, 1], [1, 6]])).tolist() == [False, False, True, False, False, True]
    assert can_take(space, levels, free=3).tolist() == [False, True] * 3  # a KV level costs 4
    g = torch.Generator().manual_seed(0)
    policy = TransferPolicy(3)
    moves = policy.sample(space, levels, 200, g)
    assert len(moves) == 200
    for move in moves:
        assert space.feasible(move.levels)
        assert space.budget - space.cost(move.levels) < int(PRICE.min())  # receivers take all they can pay
        assert move.donor not in move.receivers
        delta = move.levels - levels
        assert delta[move.donor] == -1 and int(delta.clamp_min(0).sum()) == len(move.receivers)
    assert any(len(m.receivers) >= 4 for m in moves)  # a KV group pays for four MLP levels (plus the slack)


def _exact_gradient(policy: TransferPolicy, space: AllocationSpace, levels: torch.Tensor, loss) -> torch.Tensor:
    """∇_θ E[A] by enumeration, for a space where every transfer has exactly one receiver."""
    give = policy.give.clone().requires_grad_(True)
    take = policy.take.clone().requires_grad_(True)
    donors = can_give(space, levels)
    p_give = torch.softmax(give.flatten().masked_fill(~donors, float("-inf")), 0)
    expected = 0.0
    for d in torch.nonzero(donors).flatten().tolist():
        after = levels.clone()
        after[divmod(d, 2)] -= 1
        receivers = can_take(space, after, space.budget - space.cost(after), exclude=d)
        p_take = torch.softmax(take.flatten().masked_fill(~receivers, float("-inf")), 0)
        for r in torch.nonzero(receivers).flatten().tolist():
            new = after.clone()
            new[divmod(r, 2)] += 1
            expected = expected + p_give[d] * p_take[r] * loss(new)
    expected.backward()
    return torch.cat([give.grad.flatten(), take.grad.flatten()])


def test_the_policy_gradient_is_unbiased_up_to_the_centring_factor():
    """Equal prices and no slack: every transfer is one donor and one receiver, so E[A] is a finite sum."""
    space = AllocationSpace(LOW, HIGH, torch.ones(3, 2, dtype=torch.long), budget=15)
    levels = torch.tensor([[2, 3], [3, 2], [1, 4]])  # cost 15
    weights = torch.tensor([[0.3, 0.1], [0.5, 0.2], [0.1, 0.4]], dtype=torch.float64)
    loss = lambda lv: -(weights * lv.double()).sum()  # noqa: E731
    policy = TransferPolicy(3)
    policy.give += torch.tensor([[0.2, -0.1], [0.0, 0.3], [-0.2, 0.1]], dtype=torch.float64)
    policy.take -= torch.tensor([[0.1, 0.3], [-0.2, 0.0], [0.2, -0.1]], dtype=torch.float64)
    exact = _exact_gradient(policy, space, levels, loss)
    k, total, n = 4, torch.zeros(12, dtype=torch.float64), 4000
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        trial = TransferPolicy(3)
        trial.load_state_dict(policy.state_dict())
        moves = trial.sample(space, levels, k, g)
        assert all(len(m.receivers) == 1 for m in moves)
        trial.update(moves, torch.tensor([float(loss(m.levels)) for m in moves], dtype=torch.float64), lr=1.0)
        total += torch.cat([(policy.give - trial.give).flatten(), (policy.take - trial.take).flatten()])
    assert torch.allclose(total / n, exact * (k - 1) / k, atol=0.03 * float(exact.abs().max()))


def _best_allocation(space: AllocationSpace, loss) -> tuple[torch.Tensor, float]:
    best, best_loss = None, float("inf")
    ranges = [range(int(space.low[i, t]), int(space.high[i, t]) + 1) for i in range(3) for t in range(2)]
    for combo in itertools.product(*ranges):
        levels = torch.tensor(combo).view(3, 2)
        if space.cost(levels) <= space.budget and float(loss(levels)) < best_loss:
            best, best_loss = levels, float(loss(levels))
    return best, best_loss


def test_the_transfer_search_finds_the_best_allocation_of_a_toy_problem():
    """A separable concave gain per cell: the known optimum (exhaustive search) is reached from a uniform start."""
    space = toy(budget=30)
    gains = torch.tensor([[2.0, 1.0], [0.5, 2.0], [1.0, 0.3]], dtype=torch.float64)
    loss = lambda lv: -(gains * torch.log1p(lv.double())).sum()  # noqa: E731
    best, best_loss = _best_allocation(space, loss)
    levels = torch.tensor([[2, 2], [2, 2], [2, 2]])  # cost 30
    policy, g = TransferPolicy(3), torch.Generator().manual_seed(0)
    for _ in range(300):
        centre = float(loss(levels))
        transfers = policy.sample(space, levels, 4, g)
        if len(transfers) < 2:
            continue
        advantages = torch.tensor([float(loss(t.levels)) - centre for t in transfers], dtype=torch.float64)
        policy.update(transfers, advantages, lr=5.0)
        j = int(torch.argmin(advantages))
        if advantages[j] < 0:
            levels = transfers[j].levels
    assert float(loss(levels)) == pytest.approx(best_loss)
    assert torch.equal(levels, best)


def test_reference_levels_meet_the_budget():
    space = SearchSpace.from_model(tiny_model("llama", intermediate_size=128))
    for keep in (0.5, 0.7, 0.8):
        kept = keep * space.prunable_parameters()
        levels = reference_levels(space, 16, kept)
        cost = float((levels * level_prices(space, 16)).sum())
        assert cost <= kept and cost > kept - float(level_prices(space, 16)[:, 1].max()) * space.num_layers
        assert (levels >= 1).all()


CALIB = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(5))


def _config(**overrides):
    return SearchConfig(**({"preset": "allocation", "sparsity": 0.3, "steps": 6, "batch_size": 8,
                            "held_in_blocks": 16, "block_size": 16, "incumbent_every": 2} | overrides))


def test_the_search_returns_masks_on_budget_and_never_ends_worse_than_its_start():
    model = tiny_model("llama", intermediate_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = PolicyGradientSearch(model, CALIB, _config())
    start = search._initial_state(progress=False).incumbent_loss
    result = search.run(progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is unchanged
    achieved = search.budget.achieved(result.masks)
    assert achieved["kept"] <= achieved["requested_kept"]
    assert torch.equal(search.table.masks(result.levels).mlp, result.masks.mlp)
    assert min(result.history["held_in"] + [start]) <= start
    assert search._loss(result.levels, search.held_in) <= start + 1e-12
    assert ((result.probs.attn > 0.5) == (result.masks.attn > 0.5)).all()


@pytest.mark.parametrize("loop_refit", ["lstsq", "bias", "none"])
def test_level_weights_are_what_the_refit_would_write(loop_refit):
    """A candidate scored with the table's weights computes the sub-network with those output weights."""
    model = tiny_model("llama", intermediate_size=128)
    space = SearchSpace.from_model(model)
    reference = reference_levels(space, 16, 0.7 * space.prunable_parameters())
    table = LevelTable.build(model, [CALIB[:16], CALIB[16:32]], reference, block=16, band=2, loop_refit=loop_refit,
                             progress=False)
    weights = table.weights(reference)
    if loop_refit == "none":
        assert weights == {}
    else:
        assert weights, "a pruned level has refit weights"
        for (_, kind), value in weights.items():
            assert kind in ("attn", "mlp") and (value.weight is None) == (loop_refit == "bias")


def test_resume_gives_the_uninterrupted_result(tmp_path):
    model = tiny_model("llama", intermediate_size=128)
    straight = PolicyGradientSearch(model, CALIB, _config()).run(progress=False)
    path = tmp_path / "state.pt"

    class Stop(Exception):
        pass

    def stop_after_three(step, state):
        if state.step == 3:
            raise Stop

    with pytest.raises(Stop):
        PolicyGradientSearch(model, CALIB, _config(checkpoint_every=3), checkpoint_path=path).run(
            progress=False, on_step=stop_after_three)
    resumed = PolicyGradientSearch(model, CALIB, _config(checkpoint_every=3), checkpoint_path=path).run(progress=False)
    assert torch.equal(resumed.levels, straight.levels)
    assert resumed.history == straight.history


def test_a_budget_below_one_level_per_layer_is_refused_before_work():
    model = tiny_model("llama", intermediate_size=128)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="one KV group and one MLP block"):
        PolicyGradientSearch(model, CALIB, _config(sparsity=0.75))
    assert calls == []
