"""The search loop on tiny models: no backprop, resume, model left untouched, losses, bad input."""

import os
import signal

import pytest
import torch

from pg_pruning_plugin import (
    PolicyGradientSearch,
    ResumeError,
    SearchConfig,
    SearchResult,
    SearchSpace,
    UnitMasks,
    UnitValues,
)
from pg_pruning_plugin.evaluation.speed import bernoulli_masks
from pg_pruning_plugin.reporting import format_accounting
from pg_pruning_plugin.search.costs import budget_accounting, expected_cost, unit_costs
from pg_pruning_plugin.search.loop import sample_losses
from pg_pruning_plugin.search.state_file import read_state
from tests.helpers import ARCH_CASES, random_masks, tiny_model


def _blocks(n=32, t=16, seed=0):
    return torch.randint(0, 200, (n, t), generator=torch.Generator().manual_seed(seed))


def test_samples_in_one_forward_equal_one_by_one(llama):
    space = SearchSpace.from_model(llama)
    a, b = random_masks(space, seed=1), random_masks(space, seed=2)
    masks = UnitMasks(torch.stack([a.attn, b.attn]), torch.stack([a.mlp, b.mlp]))
    batch = {"input_ids": _blocks(4)}
    with torch.no_grad():
        together = sample_losses(llama, space, batch, masks, one_forward=True)
        apart = sample_losses(llama, space, batch, masks, one_forward=False)
    torch.testing.assert_close(together, apart)


def test_search_is_forward_only_and_leaves_the_model_unchanged(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    grad_enabled = []
    llama.register_forward_pre_hook(lambda m, a: grad_enabled.append(torch.is_grad_enabled()))
    config = SearchConfig(preset="authors", steps=6, batch_size=4, init_batches=2)
    result = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)
    assert grad_enabled and not any(grad_enabled)
    assert all(p.grad is None for p in llama.parameters())
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert not any(m._forward_pre_hooks for m in llama.model.layers.modules() if m is not llama)
    # budgets: exactly the kept counts of the top-k rule, at least one unit per layer
    space = result.space
    assert int(result.masks.attn.sum()) == space.num_attn_units - int(space.num_attn_units * 0.3)
    assert all(a >= 1 and m >= 1 for a, m in result.kept_per_layer())
    # the projection only ever shifts down (method.md §6): the expected kept count never exceeds the budget
    assert float(result.probs.mlp.sum()) <= 0.7 * space.num_mlp_units + 1e-2


def test_model_is_restored_when_the_search_raises(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}

    def boom(step, state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PolicyGradientSearch(llama, _blocks(), SearchConfig(preset="authors",
                                                            steps=4, batch_size=4, init_batches=1)).run(
            progress=False, on_step=boom)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_uniform_budget_keeps_the_same_rate_in_every_layer(llama):
    config = SearchConfig(preset="authors", steps=3, batch_size=4, init_batches=1, global_budget=False, sparsity=0.5)
    result = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)
    assert len(set(result.kept_per_layer())) == 1


def test_resume_gives_the_same_mask_as_an_uninterrupted_run(llama, tmp_path):
    config = SearchConfig(preset="authors", steps=8, batch_size=4, init_batches=1, checkpoint_every=3)
    full = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)

    state = tmp_path / "state.pt"

    def stop_at_5(step, s):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False, on_step=stop_at_5)
    assert state.exists()
    resumed = PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False)
    torch.testing.assert_close(resumed.probs.attn, full.probs.attn)
    torch.testing.assert_close(resumed.probs.mlp, full.probs.mlp)
    assert torch.equal(resumed.masks.mlp, full.masks.mlp)


def test_sigint_stops_after_the_step_with_its_state_saved(llama, tmp_path):
    """Ctrl-C mid-search: the step finishes, its state is written (off the checkpoint schedule), the search
    raises KeyboardInterrupt, SIGINT is Python's again, and resuming gives the uninterrupted answer."""
    config = SearchConfig(preset="authors", steps=8, batch_size=4, init_batches=1, checkpoint_every=3)
    full = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)
    state = tmp_path / "state.pt"

    def ctrl_c_at_5(step, s):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only records it: this step still completes

    with pytest.raises(KeyboardInterrupt):
        PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False, on_step=ctrl_c_at_5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert read_state(state).step == 5  # not 3, the last scheduled checkpoint
    resumed = PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False)
    assert torch.equal(resumed.masks.mlp, full.masks.mlp) and torch.equal(resumed.masks.attn, full.masks.attn)


def test_mismatched_or_corrupt_resume_file_is_refused(llama, tmp_path):
    state = tmp_path / "state.pt"
    PolicyGradientSearch(llama, _blocks(), SearchConfig(preset="authors",
                                                        steps=2, batch_size=4, init_batches=1, checkpoint_every=1),
                         checkpoint_path=state).run(progress=False)
    with pytest.raises(ResumeError, match="another model"):
        PolicyGradientSearch(llama, _blocks(), SearchConfig(preset="authors", steps=3, batch_size=4, init_batches=1),
                             checkpoint_path=state).run(progress=False)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot read"):
        PolicyGradientSearch(llama, _blocks(), SearchConfig(preset="authors",
                                                            steps=2, batch_size=4, init_batches=1, checkpoint_every=1),
                             checkpoint_path=state).run(progress=False)


def test_result_save_and_load_round_trip(llama, tmp_path):
    config = SearchConfig(preset="authors", steps=2, batch_size=4, init_batches=1)
    result = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)
    result.save(tmp_path / "r.pt")
    loaded = type(result).load(tmp_path / "r.pt")
    assert torch.equal(loaded.probs.mlp, result.probs.mlp) and loaded.config == result.config
    assert loaded.space.layers == result.space.layers


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "must be in"), ({"sparsity": 1.0}, "must be in"), ({"mlp_sparsity": -0.1}, "must be in"),
    ({"samples_per_step": 1}, "samples_per_step"), ({"init": "nope"}, "init="), ({"round_to": 0}, "round_to"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**({"preset": "authors"} | kwargs))


def test_too_little_calibration_text_is_refused_before_work(llama):
    with pytest.raises(ValueError, match="give more calibration text"):
        PolicyGradientSearch(llama, _blocks(16), SearchConfig(preset="authors", steps=10, batch_size=4))


def test_nan_samples_are_skipped_and_counted(llama):
    space = SearchSpace.from_model(llama)
    calls = []

    def poison(module, args, output):  # every other forward returns NaN logits for sample 0
        calls.append(1)
        if len(calls) % 2:
            output.logits[: output.logits.shape[0] // 2] = float("nan")
        return output

    llama.register_forward_hook(poison)
    init = UnitValues.full(space, 0.7)
    config = SearchConfig(preset="authors", steps=4, batch_size=4)
    result = PolicyGradientSearch(llama, _blocks(), config, init_scores=init).run(progress=False)
    assert result.nan_samples == 2
    assert len(result.history["loss"]) == 2  # steps with < 2 valid samples make no update


def test_search_state_directory_is_created(llama, tmp_path):
    state = tmp_path / "not" / "yet" / "there.pt"  # e.g. runs/ in a fresh clone
    config = SearchConfig(preset="authors", steps=2, batch_size=4, init_batches=1, checkpoint_every=1)
    PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False)
    assert state.exists()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_sample_losses_batched_one_by_one_and_gathered_agree(model_type):
    overrides = dict(ARCH_CASES)[model_type] if model_type == "gemma2" else {}
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    masks = bernoulli_masks(space, 0.5, 4, seed=11)
    ids = torch.randint(0, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -3:] = 0  # padded positions are ignored by the loss
    batch = {"input_ids": ids, "attention_mask": attention_mask}
    with torch.no_grad():
        batched = sample_losses(model, space, batch, masks, one_forward=True)
        one_by_one = sample_losses(model, space, batch, masks, one_forward=False)
        gathered = sample_losses(model, space, batch, masks, execution="gather")
    assert batched.shape == (4,) and batched.std() > 0
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered, one_by_one, rtol=1e-5, atol=1e-5)


def test_search_with_gather_execution_matches_mask_execution(llama):
    blocks = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for execution in ("mask", "gather"):
        config = SearchConfig(preset="authors",
                              sparsity=0.5, steps=3, batch_size=4, max_epochs=2, init="random", init_batches=1,
                              execution=execution)
        results.append(PolicyGradientSearch(llama, blocks, config).run(progress=False))
    torch.testing.assert_close(results[0].history["loss"], results[1].history["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].probs.mlp, results[1].probs.mlp, rtol=1e-4, atol=1e-6)


def test_config_validates_execution():
    with pytest.raises(ValueError, match="execution"):
        SearchConfig(preset="authors", execution="sparse")


@pytest.mark.parametrize("estimator", ["loo", "antithetic"])
def test_search_runs_with_each_estimator(estimator):
    model = tiny_model("llama")
    blocks = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(preset="authors",
                          sparsity=0.5, steps=4, batch_size=4, max_epochs=2, samples_per_step=4, lr=0.05,
                          estimator=estimator)
    start = UnitValues.full(SearchSpace.from_model(model), 0.5)
    result = PolicyGradientSearch(model, blocks, config, init_scores=start).run(progress=False)
    assert len(result.history["loss"]) == 4
    assert not torch.equal(result.probs.mlp, start.mlp)  # the scores moved
    assert abs(float(result.probs.mlp.sum()) - 0.5 * result.probs.mlp.numel()) < 1.0  # budget held


def test_search_with_blocks_runs_resumes_and_saves(llama, tmp_path):
    blocks = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(preset="authors",
                          sparsity=0.4, steps=6, batch_size=4, init_batches=2, granularity="width+depth",
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
        if search_state.step == 3:
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
    result = PolicyGradientSearch(llama, blocks, SearchConfig(preset="authors",
                                                              sparsity=0.3, steps=4, batch_size=4, init_batches=2,
                                                              granularity="depth", init="constant")).run(progress=False)
    assert torch.equal(result.probs.attn, torch.ones_like(result.probs.attn))
    assert torch.equal(result.masks.mlp, torch.ones_like(result.masks.mlp))
    assert result.masks.attn_blocks.numel() == 3
