"""The policy: the authors' estimator term by term, the lower-variance estimators (unbiased on a toy
objective, lower variance), sampling, the EMA baseline, and estimator plus projection on a toy problem."""

import math

import pytest
import torch

from pg_pruning_plugin import SearchConfig, UnitValues
from pg_pruning_plugin.core.selection import top_k_mask
from pg_pruning_plugin.search.budget import project_to_budget
from pg_pruning_plugin.search.policy import (
    EPS,
    ESTIMATORS,
    antithetic_gradient,
    ema_baseline,
    estimate_gradient,
    policy_gradient,
    sample_masks,
    sample_unit_masks,
    usable_samples,
)


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


PROBS = torch.tensor([0.2, 0.5, 0.9, 0.65])


def _toy_loss(m: torch.Tensor) -> torch.Tensor:
    """``L(m) = 4 + 2 m0 − m1 + 3 m0 m2 + 0.5 m1 m2 − m3``: rows of ``m`` are samples."""
    return 4 + 2 * m[:, 0] - m[:, 1] + 3 * m[:, 0] * m[:, 2] + 0.5 * m[:, 1] * m[:, 2] - m[:, 3]


def _authors_scale_target(k: int) -> torch.Tensor:
    """``K/(K−1) · sqrt(s(1−s)) · ∂E[L]/∂s``: the authors' estimator's mean with a constant baseline."""
    s = PROBS.double()
    d_ds = torch.stack([2 + 3 * s[2], -1 + 0.5 * s[2], 3 * s[0] + 0.5 * s[1], torch.tensor(-1.0, dtype=s.dtype)])
    return (k / (k - 1) * torch.sqrt(s * (1 - s)) * d_ds).float()


def _estimates(estimator: str, k: int, draws: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(draws, PROBS.numel())
    for i in range(draws):
        masks = sample_masks(PROBS, k, gen, antithetic=estimator == "antithetic")
        out[i] = policy_gradient(estimator, _toy_loss(masks), masks, PROBS, baseline=0.0)
    return out


@pytest.mark.parametrize("estimator,k", [("loo", 2), ("loo", 4), ("antithetic", 2), ("antithetic", 4),
                                         ("authors", 2)])
def test_estimators_are_unbiased_on_the_authors_scale(estimator, k):
    est = _estimates(estimator, k, draws=3000)
    stderr = est.std(0) / est.shape[0] ** 0.5
    err = (est.mean(0) - _authors_scale_target(k)).abs()
    assert (err < 4 * stderr + 1e-3).all(), (est.mean(0), _authors_scale_target(k), stderr)


def test_loo_and_antithetic_have_lower_variance_than_a_constant_baseline():
    """With the baseline far from the loss (here 0 against L ≈ 5) the authors' form is noisy."""
    variance = {name: _estimates(name, 2, draws=3000, seed=1).var(0).sum() for name in ESTIMATORS}
    assert variance["loo"] < 0.5 * variance["authors"]
    assert variance["antithetic"] < variance["loo"]


def test_loo_is_the_leave_one_out_baseline_in_the_authors_normalisation():
    losses = torch.tensor([2.0, 3.0, 7.0])
    masks = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    z = (masks - PROBS) / torch.sqrt((PROBS + 1e-7) * (1 - PROBS + 1e-7))
    expected = sum((losses[j] - (losses.sum() - losses[j]) / 2) * z[j] for j in range(3)) / 2
    torch.testing.assert_close(policy_gradient("loo", losses, masks, PROBS, baseline=123.0), expected)


def test_antithetic_sampling_pairs_u_and_one_minus_u():
    gen = torch.Generator().manual_seed(0)
    half = torch.full((2000,), 0.5)
    m = sample_masks(half, 4, gen, antithetic=True)
    assert torch.equal(m[0] + m[1], torch.ones(2000)) and torch.equal(m[2] + m[3], torch.ones(2000))
    m = sample_masks(PROBS.repeat(500), 2000, torch.Generator().manual_seed(1), antithetic=True)
    torch.testing.assert_close(m.mean(0).view(500, 4).mean(0), PROBS, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="even"):
        sample_masks(PROBS, 3, gen, antithetic=True)
    with pytest.raises(ValueError, match="even"):
        antithetic_gradient(torch.ones(3), torch.ones(3, 4), PROBS)


def test_authors_sampling_is_unchanged():
    """The default path draws exactly what the search drew before the estimator option existed."""
    probs = torch.rand(50)
    expected = (torch.rand(3, 50, generator=torch.Generator().manual_seed(5)) < probs).float()
    torch.testing.assert_close(sample_masks(probs, 3, torch.Generator().manual_seed(5)), expected)
    torch.testing.assert_close(policy_gradient("authors", torch.tensor([1.0, 2.0, 4.0]), expected, probs, 1.5),
                               estimate_gradient(torch.tensor([1.0, 2.0, 4.0]), expected, probs, 1.5))


def test_non_finite_losses_drop_whole_antithetic_pairs():
    losses = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    assert usable_samples(losses, "antithetic").tolist() == [False, False, True, True]
    assert usable_samples(losses, "loo").tolist() == [True, False, True, True]


def test_unknown_estimator_is_rejected_before_work():
    with pytest.raises(ValueError, match="estimator"):
        SearchConfig(preset="authors", estimator="vimco")
    with pytest.raises(ValueError, match="even"):
        SearchConfig(preset="authors", estimator="antithetic", samples_per_step=3)
    with pytest.raises(ValueError, match="unknown estimator"):
        policy_gradient("vimco", torch.ones(2), torch.ones(2, 4), PROBS, 0.0)


def test_ema_baseline_includes_the_current_batch():
    assert ema_baseline(None, 3.0, 5) == 3.0 and ema_baseline(2.0, 7.0, 5) == pytest.approx(0.8 * 2.0 + 7.0 / 5)
    assert ema_baseline(2.0, 7.0, 0) == 0.0  # no baseline: plain REINFORCE


def test_unsearched_types_are_sampled_as_all_ones():
    probs = UnitValues(torch.full((4,), 0.5), torch.full((6,), 0.5), torch.full((2,), 0.5), torch.full((2,), 0.5))
    masks = sample_unit_masks(probs, ("attn_blocks", "mlp_blocks"), 3, torch.Generator().manual_seed(0))
    assert masks.num_samples == 3 and torch.equal(masks.attn, torch.ones(3, 4)) and masks.attn_blocks.shape == (3, 2)

