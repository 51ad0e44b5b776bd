"""The per-unit search's levers: KL loss, band sampling, the incumbent, FLAP's bias in the loop, and resume."""

from __future__ import annotations

import pytest
import torch

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace
from pg_pruning_plugin.core.units import UnitValues
from pg_pruning_plugin.search.objective import dense_targets, sequence_losses
from pg_pruning_plugin.search.policy import threshold_band
from tests.helpers import tiny_model

CALIB = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(2))


def _config(**overrides):
    return SearchConfig(**({"preset": "authors", "sparsity": 0.3, "steps": 6, "batch_size": 8, "init_batches": 2,
                            "lr": 0.05, "init_mapping": "mask", "max_epochs": 3} | overrides))


def test_kl_to_the_dense_model_is_zero_for_the_dense_model_and_positive_otherwise():
    model = tiny_model("llama")
    batch = {"input_ids": CALIB[:4]}
    target = dense_targets(model, [batch], top_k=200)[0]  # the whole vocabulary: the exact KL
    with torch.no_grad():
        logits = model(**batch).logits
    assert sequence_losses(logits, batch, "kl", target).abs().max() < 1e-5
    assert (sequence_losses(logits * 0.5, batch, "kl", target) > 1e-4).all()
    with pytest.raises(ValueError, match="dense model's targets"):
        sequence_losses(logits, batch, "kl")


def test_the_band_holds_the_units_next_to_each_threshold():
    space = SearchSpace.from_model(tiny_model("llama"))
    probs = UnitValues(torch.linspace(0, 1, space.num_attn_units), torch.rand(space.num_mlp_units))
    hard = UnitValues((probs.attn > 0.5).float(), (probs.mlp > 0.5).float())
    band = threshold_band(probs, hard, space, fraction=0.1)
    for i in range(space.num_layers):
        sl = space.mlp_slice(i)
        n = sl.stop - sl.start
        assert int(band.mlp[sl].sum()) <= 2 * round(0.1 * n)
        inside = probs.mlp[sl][band.mlp[sl] > 0]
        outside = probs.mlp[sl][band.mlp[sl] == 0]
        kept_prob = probs.mlp[sl][hard.mlp[sl] > 0].min()
        assert ((outside >= kept_prob) | (outside < inside.min())).all()  # the band sits at the threshold


def test_band_steps_sample_only_inside_the_band():
    model = tiny_model("llama")
    seen = []
    search = PolicyGradientSearch(model, CALIB, _config(band=0.1, execution="gather"))
    original = search.sample_losses

    def spy(batch, masks, target=None):
        seen.append(masks)
        return original(batch, masks, target)

    search.sample_losses = spy
    state = search._initial_state(progress=False)
    hard = search.budget.hard_mask(state.probs)
    band = threshold_band(state.probs, hard, search.space, 0.1)
    search.step(state)
    outside = band.mlp == 0
    assert outside.any() and (band.mlp > 0).any()
    assert (seen[0].mlp[:, outside] == hard.mlp[outside]).all()  # outside the band every sample is the hard mask


@pytest.mark.parametrize("overrides", [dict(loss="kl"), dict(loop_refit="bias", execution="gather"),
                                       dict(estimator="loo"), dict(band=0.2, execution="gather")])
def test_the_incumbent_never_ends_worse_than_the_start(overrides):
    model = tiny_model("llama")
    search = PolicyGradientSearch(model, CALIB, _config(incumbent_every=2, held_in_blocks=16, **overrides))
    start = search._initial_state(progress=False)
    result = search.run(progress=False)
    assert search._held_in_loss(result.probs) <= start.incumbent_loss + 1e-9
    assert len(result.history["held_in"]) == 3


def test_resume_keeps_the_incumbent(tmp_path):
    model = tiny_model("llama")
    config = _config(incumbent_every=2, held_in_blocks=16, loss="kl", checkpoint_every=3)
    straight = PolicyGradientSearch(model, CALIB, config).run(progress=False)

    class Stop(Exception):
        pass

    def stop(step, state):
        if state.step == 3:
            raise Stop

    path = tmp_path / "state.pt"
    with pytest.raises(Stop):
        PolicyGradientSearch(model, CALIB, config, checkpoint_path=path).run(progress=False, on_step=stop)
    resumed = PolicyGradientSearch(model, CALIB, config, checkpoint_path=path).run(progress=False)
    assert torch.equal(resumed.masks.mlp, straight.masks.mlp) and resumed.history == straight.history


@pytest.mark.parametrize("kwargs,match", [
    (dict(band=0.6), "band="), (dict(loop_refit="lstsq"), "'none' or 'bias'"),
    (dict(loop_refit="bias", execution="mask"), "execution='gather'"),
])
def test_bad_lever_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)
