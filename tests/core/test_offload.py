"""Models dispatched by accelerate with CPU/disk offload: the search (both policies), the metrics, the refit,
removal and saving give what the undispatched model gives (same masks, same logits)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace, load_pruned, prune_model, save_pruned
from pg_pruning_plugin.core.masking import masked
from pg_pruning_plugin.core.offload import execution_device, is_offloaded, onloaded
from pg_pruning_plugin.core.subnetwork import subnetwork
from pg_pruning_plugin.refit import refit
from pg_pruning_plugin.scoring.baselines import baseline_masks, taylor_scores
from pg_pruning_plugin.scoring.metrics import compute_metric
from tests.helpers import random_masks, tiny_model

CALIB = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(7))
IDS = CALIB[:3]
# layer 1 on the disk, layer 2 offloaded to the CPU's weights map; everything runs on the CPU
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def _dispatched(tmp_path, model=None):
    model = tiny_model("llama") if model is None else model
    return dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"), main_device="cpu")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_the_dispatch_offloads_and_runs_on_the_cpu(tmp_path):
    model = _dispatched(tmp_path)
    o_proj = model.model.layers[1].self_attn.o_proj
    assert is_offloaded(o_proj) and o_proj.weight.device.type == "meta"
    assert execution_device(o_proj) == torch.device("cpu")
    assert not is_offloaded(model.model.layers[0].self_attn.o_proj)
    with onloaded(o_proj):
        assert o_proj.weight.device.type == "cpu"
    assert o_proj.weight.device.type == "meta"
    assert torch.equal(_logits(model), _logits(tiny_model("llama")))


def test_masked_and_subnetwork_execution_equal_the_undispatched_model(tmp_path):
    plain, model = tiny_model("llama"), _dispatched(tmp_path)
    space = SearchSpace.from_model(plain)
    masks = random_masks(space, keep=0.5)
    for context in (masked, subnetwork):
        with context(plain, space, masks):
            expected = _logits(plain)
        with context(model, space, masks):
            assert torch.equal(_logits(model), expected), context.__name__
    assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # offloaded again afterwards
    assert torch.equal(_logits(model), _logits(plain))


@pytest.mark.parametrize("config", [
    dict(execution="gather"),
    dict(execution="mask", init="wifv"),
    dict(preset="allocation", steps=4, samples_per_step=3, incumbent_every=2, held_in_blocks=8, block_size=16),
], ids=["units-gather", "units-mask", "allocation"])
def test_the_search_finds_the_same_masks(tmp_path, config):
    config = SearchConfig(**({"preset": "authors", "steps": 6, "batch_size": 4, "init_batches": 4} | config))
    expected = PolicyGradientSearch(tiny_model("llama"), CALIB, config).run(progress=False)
    model = _dispatched(tmp_path)
    result = PolicyGradientSearch(model, CALIB, config).run(progress=False)
    for kind in ("attn", "mlp"):
        assert torch.equal(getattr(result.masks, kind), getattr(expected.masks, kind)), kind
        assert torch.equal(getattr(result.probs, kind), getattr(expected.probs, kind)), kind
    assert torch.equal(_logits(model), _logits(tiny_model("llama")))  # the model is unchanged


def test_metrics_and_baselines_equal_the_undispatched_model(tmp_path):
    plain, model = tiny_model("llama"), _dispatched(tmp_path)
    space = SearchSpace.from_model(plain)
    batches = list(CALIB[:16].split(4))
    for method in ("wanda-sp", "wifv", "magnitude"):
        a = compute_metric(plain, space, method, batches, keep_ratio=0.7, progress=False)
        b = compute_metric(model, space, method, batches, keep_ratio=0.7, progress=False)
        assert torch.equal(a.attn, b.attn) and torch.equal(a.mlp, b.mlp), method
    for method in ("flap", "shortgpt"):
        a = baseline_masks(plain, method, 0.3, batches, progress=False)
        b = baseline_masks(model, method, 0.3, batches, progress=False)
        assert torch.equal(a.scores.as_dict()["attn"], b.scores.as_dict()["attn"]), method
    with pytest.raises(ValueError, match="accelerate offloads"):
        taylor_scores(model, batches, progress=False)


@pytest.mark.parametrize("method", ["lstsq", "bias"])
def test_refit_removal_and_saving_follow_the_offloaded_weights(tmp_path, method):
    plain = tiny_model("llama")
    space = SearchSpace.from_model(plain)
    masks = random_masks(space, keep=0.6)
    model = _dispatched(tmp_path, copy.deepcopy(plain))
    refit(plain, masks, CALIB[:16], method, batch_size=4, progress=False)
    refit(model, masks, CALIB[:16], method, batch_size=4, progress=False)
    assert torch.allclose(_logits(model), _logits(plain), atol=1e-6)
    prune_model(plain, masks)
    prune_model(model, masks)
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert model.model.layers[1].mlp.down_proj.weight.shape == plain.model.layers[1].mlp.down_proj.weight.shape
    assert torch.allclose(_logits(model), _logits(plain), atol=1e-6)
    out = save_pruned(model, tmp_path / "pruned")
    assert torch.allclose(_logits(load_pruned(out)), _logits(plain), atol=1e-6)
