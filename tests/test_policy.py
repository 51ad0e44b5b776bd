"""The numerical core: estimator, projection, score mapping and hard masks."""

import math

import pytest
import torch

from pg_pruning_plugin.search.policy import EPS, estimate_gradient, project_pools, project_to_budget, scores_from_metric, top_k_mask


def test_estimator_matches_the_authors_formula_term_by_term():
    s = torch.tensor([0.2, 0.5, 0.9])
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    losses = torch.tensor([2.0, 3.0, 5.0])
    b = 3.5
    expected = torch.zeros(3)
    for j in range(3):
        for u in range(3):
            expected[u] += (losses[j] - b) * (masks[j, u] - s[u]) / math.sqrt((s[u] + EPS) * (1 - s[u] + EPS))
    expected /= 3 - 1
    torch.testing.assert_close(estimate_gradient(losses, masks, s, b), expected)


def test_estimator_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        estimate_gradient(torch.tensor([1.0]), torch.ones(1, 3), torch.full((3,), 0.5), 0.0)


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


def test_sigmap_mean_is_the_init_rate_and_order_is_kept():
    metric = torch.randn(1000)
    s = scores_from_metric(metric, 0.7)
    assert abs(float(s.mean()) - 0.7) < 0.02
    assert torch.equal(torch.argsort(s[s < 1]), torch.argsort(metric[s < 1]))
    with pytest.raises(ValueError, match="unknown score mapping"):
        scores_from_metric(metric, 0.7, "bogus")


def test_top_k_global_keeps_budget_and_one_unit_per_layer():
    s = torch.cat([torch.zeros(10), torch.ones(10)])  # layer 0 would be emptied by a plain global top-k
    mask = top_k_mask(s, 0.5, [0, 10, 20], global_pool=True)
    assert mask.sum() == 10  # the reserved unit counts against the budget
    assert mask[:10].sum() == 1 and mask[10:].sum() == 9


def test_top_k_per_layer_and_rounding():
    s = torch.rand(200)
    mask = top_k_mask(s, 0.7, [0, 100, 200], global_pool=False)
    assert mask[:100].sum() == 70 and mask[100:].sum() == 70
    rounded = top_k_mask(s, 0.7, [0, 100, 200], global_pool=False, round_to=32)
    assert rounded[:100].sum() == 64 and rounded[100:].sum() == 64
    # the kept units are the most probable ones of each layer
    assert s[:100][rounded[:100].bool()].min() >= s[:100][~rounded[:100].bool()].max()


def test_estimator_and_projection_find_the_known_best_mask():
    """Toy problem: loss = Σ_u w_u (1 - m_u); the best mask under the budget keeps the largest w."""
    g = torch.Generator().manual_seed(0)
    n, keep = 40, 0.5
    # half the units matter (w in [0.5, 1]), half barely (w in [0, 0.2]); order shuffled
    w = torch.cat([0.5 + 0.5 * torch.rand(n // 2, generator=g), 0.2 * torch.rand(n // 2, generator=g)])
    w = w[torch.randperm(n, generator=g)]
    s = torch.full((n,), keep)
    baseline = None
    steps = 3000
    for t in range(steps):
        masks = (torch.rand(2, n, generator=g) < s).float()
        losses = ((1 - masks) * w).sum(1)
        baseline = float(losses.mean()) if baseline is None else 0.8 * baseline + 0.2 * float(losses.mean())
        lr = 0.005 * 0.5 * (1 + math.cos(math.pi * t / steps))
        s = project_to_budget(s - lr * estimate_gradient(losses, masks, s, baseline), keep * n)
    best = torch.zeros(n)
    best[torch.topk(w, n // 2).indices] = 1
    assert torch.equal(top_k_mask(s, keep, [0, n], global_pool=True), best)


def test_expected_width_rule_gives_each_layer_its_expected_count():
    s = torch.cat([torch.full((10,), 0.9), torch.full((10,), 0.3)])
    s[:10] += torch.linspace(0, 0.05, 10)  # distinct within layers
    mask = top_k_mask(s, 0.6, [0, 10, 20], global_pool=True, rule="expected-width")
    assert mask.sum() == 12  # exact budget
    assert mask[:10].sum() == 9 and mask[10:].sum() == 3  # proportional to Σ s per layer (9.x : 3)
    with pytest.raises(ValueError, match="unknown mask rule"):
        top_k_mask(s, 0.6, [0, 10, 20], global_pool=True, rule="bogus")


def test_mask_mapping_starts_from_the_per_layer_init_mask():
    metric = torch.randn(50)
    s = scores_from_metric(metric, 0.6, "mask", confidence=0.8)
    torch.testing.assert_close(s.unique(), torch.tensor([0.2, 0.8]))
    assert torch.equal(s > 0.5, top_k_mask(metric, 0.6, [0, 50], global_pool=False).bool())
