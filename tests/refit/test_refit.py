"""The refit step on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from pg_pruning_plugin import SearchSpace, UnitValues, load_pruned, prune_model, save_pruned
from pg_pruning_plugin.core.architectures import decoder_layers
from pg_pruning_plugin.core.masking import masked
from pg_pruning_plugin.refit import (
    InputStatistics,
    LayerStream,
    NonFiniteActivationError,
    lstsq_weights,
    refit,
    relative_error,
)
from tests.helpers import ARCH_CASES, ARCH_IDS, random_masks, tiny_model

CALIB = torch.randint(0, 200, (16, 24), generator=torch.Generator().manual_seed(3))  # 384 tokens


def _projections(model):
    space = SearchSpace.from_model(model)
    spec = space.spec
    return [(getattr(getattr(layer, spec.attention), spec.o), getattr(getattr(layer, spec.mlp), spec.down))
            for layer in decoder_layers(model)]


def _logits(model, ids=CALIB[:4]):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_refit_then_prune_round_trips_on_every_architecture(model_type, overrides, tmp_path):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    masks = random_masks(space, keep=0.6)
    report = refit(model, masks, CALIB, "lstsq", batch_size=4, progress=False)
    assert report.projections and all(p.error_after <= p.error_before + 1e-9 for p in report.projections)
    refit_masked = _logits(model)
    prune_model(model, masks)
    assert torch.allclose(_logits(model), refit_masked, atol=1e-5)
    save_pruned(model, tmp_path / "out")
    assert torch.allclose(_logits(load_pruned(tmp_path / "out")), refit_masked, atol=1e-5)


def test_refit_lowers_the_loss_of_a_pruned_model():
    dense = tiny_model("llama")
    space = SearchSpace.from_model(dense)
    masks = random_masks(space, keep=0.5)
    target = _logits(dense, CALIB)
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    refit(plain, masks, CALIB, "none", batch_size=4, progress=False)
    refit(fitted, masks, CALIB, "lstsq", batch_size=4, progress=False)
    err = lambda m: float((_logits(m, CALIB) - target).pow(2).mean())  # noqa: E731
    assert err(fitted) < 0.7 * err(plain)


def test_keeping_every_unit_leaves_the_weights_unchanged():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    space = SearchSpace.from_model(model)
    report = refit(model, UnitValues.full(space, 1.0), CALIB, "lstsq", batch_size=4, progress=False)
    assert report.projections == []
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_lstsq_weights_equal_torch_lstsq_on_the_same_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)  # tokens x channels
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    gram = x.T @ x
    ours = lstsq_weights(w, gram, kept, damping=1e-12)
    theirs = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # min ‖X_k Vᵀ − X Wᵀ‖
    assert torch.allclose(ours, theirs, atol=1e-8)
    assert relative_error(w, gram, kept, ours) <= relative_error(w, gram, kept, w[:, kept])


def test_statistics_match_a_direct_computation():
    model = tiny_model("llama")
    o_proj = _projections(model)[1][0]
    seen = []
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=CALIB, use_cache=False)
    handle.remove()
    stream = LayerStream(model, [CALIB[:8], CALIB[8:]])
    stream.advance(0)
    with InputStatistics(o_proj) as stats:
        stream.run_until(1, o_proj)
    x = torch.cat(seen).double()
    assert stats.tokens == x.shape[0]
    assert torch.allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.mean, x.mean(0), atol=1e-6)


def test_stream_capture_builds_no_graph_and_skips_the_head():
    """Capturing the layer inputs runs no autograd graph and never the LM head (its logits are the largest
    activation of a forward pass), even when called with gradients enabled."""
    model = tiny_model("llama")
    head_calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1))
    with torch.enable_grad():
        stream = LayerStream(model, [CALIB[:8], CALIB[8:]])
    handle.remove()
    assert not head_calls and len(stream.hidden) == 2
    assert not any(h.requires_grad for h in stream.hidden)
    assert len(stream.kwargs[0]) == len(decoder_layers(model))  # every layer's arguments, the last one's too


def test_statistics_are_sequential():
    """Layer 1's statistics are those of the model pruned and refitted at layer 0."""
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    masks = random_masks(space, keep=0.5)
    reference = copy.deepcopy(model)
    refit(model, masks, CALIB, "lstsq", batch_size=8, progress=False)
    # run the refitted layer 0 and the still-dense layer 1 of a copy: layer 1's o_proj input must equal the one
    # the refit measured, i.e. come from the pruned layer 0
    o1 = _projections(reference)[1][0]
    seen = []
    layer0 = decoder_layers(reference)[0]
    layer0.load_state_dict(decoder_layers(model)[0].state_dict())
    handle = o1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        reference(input_ids=CALIB, use_cache=False)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    kept = torch.nonzero(masks.attn[space.attn_slice(1)]).flatten()
    # reconstructing layer 1's o_proj on these inputs with the refit's formula gives the refit's weights
    shape = space.layers[1]
    width = shape.queries_per_group * shape.head_dim
    columns = (kept[:, None] * width + torch.arange(width)).flatten()
    expected = lstsq_weights(o1.weight, x.T @ x, columns, damping=0.01)
    assert torch.allclose(_projections(model)[1][0].weight[:, columns].double(), expected, atol=1e-4)


def test_bias_refit_compensates_the_mean_and_saves(tmp_path):
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    masks = random_masks(space, keep=0.5)
    refit(model, masks, CALIB, "bias", batch_size=4, progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    assert all(o.bias is not None and down.bias is not None for o, down in _projections(model))
    expected = _logits(model)
    prune_model(model, masks)
    save_pruned(model, tmp_path / "out")
    assert torch.allclose(_logits(load_pruned(tmp_path / "out")), expected, atol=1e-5)


def test_dense_input_target_fits_the_dense_stream():
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    masks = random_masks(space, keep=0.5)
    report = refit(model, masks, CALIB, "lstsq", target="dense-input", batch_size=4, progress=False)
    assert report.target == "dense-input"
    assert all(p.error_after <= p.error_before + 1e-9 for p in report.projections)


def test_removed_blocks_are_zeroed():
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    masks = random_masks(space)
    masks.attn_blocks, masks.mlp_blocks = torch.tensor([1.0, 0, 1]), torch.tensor([0.0, 1, 1])
    refit(model, masks, CALIB, "lstsq", batch_size=4, progress=False)
    with masked(copy.deepcopy(model), space, masks) as reference:
        expected = _logits(reference)
    assert torch.allclose(_logits(model), expected, atol=1e-5)
    projections = _projections(model)
    assert not projections[1][0].weight.any() and not projections[0][1].weight.any()


def test_bad_input_is_refused_before_any_forward():
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    wrong = UnitValues(torch.ones(space.num_attn_units + 1), torch.ones(space.num_mlp_units))
    with pytest.raises(ValueError, match="masks cover"):
        refit(model, wrong, CALIB)
    with pytest.raises(ValueError, match="refit method"):
        refit(model, random_masks(space), CALIB, "ols")
    with pytest.raises(ValueError, match="damping"):
        refit(model, random_masks(space), CALIB, damping=0)
    pruned = prune_model(tiny_model("llama"), UnitValues(torch.ones(space.num_attn_units), torch.ones(
        space.num_mlp_units), torch.tensor([1.0, 0, 1]), torch.ones(3)))
    with pytest.raises(ValueError, match="unpruned model"):
        refit(pruned, random_masks(space), CALIB)
    assert calls == []


def test_few_tokens_warn_with_the_number_needed(caplog):
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    with caplog.at_level(logging.WARNING, logger="pg_pruning_plugin.refit"):
        refit(model, random_masks(space, keep=0.9), CALIB[:1, :8], "lstsq", progress=False)
    assert "calibration tokens for" in caplog.text and "give at least" in caplog.text


def test_non_finite_activations_name_the_layer():
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    with torch.no_grad():
        decoder_layers(model)[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer 1"):
        refit(model, random_masks(space), CALIB, progress=False)
