"""The search loop on tiny models: masking, no backprop, resume, model left untouched, bad input."""

import pytest
import torch

from pg_pruning_plugin import PolicyGradientSearch, ResumeError, SearchConfig, SearchSpace, UnitMasks, UnitScores, masked
from pg_pruning_plugin.search.loop import sample_losses
from tests.tiny_models import ARCH_CASES, random_masks, tiny_model


def _blocks(n=32, t=16, seed=0):
    return torch.randint(0, 200, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES)
def test_all_ones_mask_reproduces_dense_logits_exactly(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    ids = _blocks(4)
    with torch.no_grad():
        dense = model(ids).logits
        with masked(model, space, UnitMasks.ones(space)):
            ones = model(ids).logits
            hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert torch.equal(dense, ones)
    assert hooks == 0  # nothing to mask, nothing added to the forward


def test_only_blocks_that_drop_units_get_a_hook(llama):
    space = SearchSpace.from_model(llama)
    masks = UnitMasks.ones(space)
    masks.mlp[0, space.mlp_offsets[1]] = 0
    with masked(llama, space, masks):
        hooked = [name for name, m in llama.named_modules() if m._forward_pre_hooks]
    assert hooked == ["model.layers.1.mlp.down_proj"]


def test_mask_equals_zeroed_weights(llama):
    space = SearchSpace.from_model(llama)
    masks = random_masks(space)
    ids = _blocks(2)
    with torch.no_grad(), masked(llama, space, UnitMasks(masks.attn, masks.mlp)):
        via_hooks = llama(ids).logits
    spec = space.spec
    for i, layer in enumerate(llama.model.layers):
        shape = space.layers[i]
        cols = masks.attn[space.attn_slice(i)].repeat_interleave(shape.queries_per_group * shape.head_dim)
        getattr(layer.self_attn, spec.o).weight.data *= cols
        getattr(layer.mlp, spec.down).weight.data *= masks.mlp[space.mlp_slice(i)]
    with torch.no_grad():
        torch.testing.assert_close(via_hooks, llama(ids).logits)


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
    result = PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=6, batch_size=4, init_batches=2)).run(progress=False)
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
        PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=4, batch_size=4, init_batches=1)).run(
            progress=False, on_step=boom)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_uniform_budget_keeps_the_same_rate_in_every_layer(llama):
    config = SearchConfig(steps=3, batch_size=4, init_batches=1, global_budget=False, sparsity=0.5)
    result = PolicyGradientSearch(llama, _blocks(), config).run(progress=False)
    assert len(set(result.kept_per_layer())) == 1


def test_resume_gives_the_same_mask_as_an_uninterrupted_run(llama, tmp_path):
    config = SearchConfig(steps=8, batch_size=4, init_batches=1, checkpoint_every=3)
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


def test_mismatched_or_corrupt_resume_file_is_refused(llama, tmp_path):
    state = tmp_path / "state.pt"
    PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=2, batch_size=4, init_batches=1, checkpoint_every=1),
                         checkpoint_path=state).run(progress=False)
    with pytest.raises(ResumeError, match="another model"):
        PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=3, batch_size=4, init_batches=1),
                             checkpoint_path=state).run(progress=False)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot read"):
        PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=2, batch_size=4, init_batches=1, checkpoint_every=1),
                             checkpoint_path=state).run(progress=False)


def test_result_save_and_load_round_trip(llama, tmp_path):
    result = PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=2, batch_size=4, init_batches=1)).run(progress=False)
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
        SearchConfig(**kwargs)


def test_too_little_calibration_text_is_refused_before_work(llama):
    with pytest.raises(ValueError, match="give more calibration text"):
        PolicyGradientSearch(llama, _blocks(16), SearchConfig(steps=10, batch_size=4))


def test_nan_samples_are_skipped_and_counted(llama):
    space = SearchSpace.from_model(llama)
    calls = []

    def poison(module, args, output):  # every other forward returns NaN logits for sample 0
        calls.append(1)
        if len(calls) % 2:
            output.logits[: output.logits.shape[0] // 2] = float("nan")
        return output

    llama.register_forward_hook(poison)
    init = UnitScores(torch.full((space.num_attn_units,), 0.7), torch.full((space.num_mlp_units,), 0.7))
    result = PolicyGradientSearch(llama, _blocks(), SearchConfig(steps=4, batch_size=4), init_scores=init).run(progress=False)
    assert result.nan_samples == 2
    assert len(result.history["loss"]) == 2  # steps with < 2 valid samples make no update


def test_uniform_widths_the_config_rejects_still_save_and_load(tmp_path):
    from pg_pruning_plugin import load_pruned, prune_model, save_pruned

    model = tiny_model("llama", num_attention_heads=12, num_key_value_heads=4, head_dim=8, hidden_size=96)
    space = SearchSpace.from_model(model)
    attn = torch.ones(space.num_attn_units)
    attn[0::4] = 0  # 9 query heads per layer: 96 % 9 != 0, which LlamaConfig refuses
    prune_model(model, UnitScores(attn, torch.ones(space.num_mlp_units)))
    assert model.config.num_attention_heads == 12 and model.config.pruned_layers[0]["num_attention_heads"] == 9
    save_pruned(model, tmp_path / "out")
    ids = _blocks(1)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "out")(ids).logits, model(ids).logits)


def test_search_state_directory_is_created(llama, tmp_path):
    state = tmp_path / "not" / "yet" / "there.pt"  # e.g. runs/ in a fresh clone
    config = SearchConfig(steps=2, batch_size=4, init_batches=1, checkpoint_every=1)
    PolicyGradientSearch(llama, _blocks(), config, checkpoint_path=state).run(progress=False)
    assert state.exists()
