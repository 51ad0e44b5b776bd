"""Sub-network execution (gathered kept weights) against the masked-multiply path, on every family."""

from __future__ import annotations

import json

import pytest
import torch
from tests.tiny_models import ARCH_CASES, tiny_model

from pg_pruning_plugin import SearchSpace, UnitMasks, masked
from pg_pruning_plugin.search.loop import PolicyGradientSearch, SearchConfig, sample_losses
from pg_pruning_plugin.core.subnetwork import subnetwork


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bernoulli(space: SearchSpace, keep: float, num_samples: int, seed: int) -> UnitMasks:
    g = torch.Generator().manual_seed(seed)
    return UnitMasks((torch.rand(num_samples, space.num_attn_units, generator=g) < keep).float(),
                     (torch.rand(num_samples, space.num_mlp_units, generator=g) < keep).float())


def _edge_masks(space: SearchSpace) -> UnitMasks:
    """Layer 0 keeps no KV group, layer 1 no MLP channel, layer 2 everything; the rest is mixed."""
    masks = _bernoulli(space, 0.5, 1, seed=3)
    masks.attn[0, space.attn_slice(0)] = 0
    masks.mlp[0, space.mlp_slice(1)] = 0
    masks.attn[0, space.attn_slice(2)] = 1
    masks.mlp[0, space.mlp_slice(2)] = 1
    masks.attn[0, space.attn_offsets[1]] = 0  # a partly kept attention block
    masks.attn[0, space.attn_offsets[1] + 1] = 1
    return masks


ALL_CASES = ARCH_CASES + [("llama", {"attention_bias": True, "mlp_bias": True})]  # o/down biases too


@pytest.mark.parametrize("model_type,overrides", ALL_CASES,
                         ids=[t + "".join(f"-{k}" for k in o) for t, o in ALL_CASES])
def test_gather_equals_masked_and_restores_the_model(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    before = _state(model)
    params_before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = model(ids).logits
    for masks in (_edge_masks(space), _bernoulli(space, 0.5, 1, seed=7), UnitMasks.ones(space)):
        with torch.no_grad():
            with masked(model, space, masks):
                reference = model(ids).logits
            with subnetwork(model, space, masks):
                gathered = model(ids).logits
        torch.testing.assert_close(gathered, reference, rtol=1e-5, atol=1e-5)
        if masks.attn.sum() < space.num_attn_units:
            assert (gathered - dense).abs().max() > 1e-3  # the masks do remove something
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())
    torch.testing.assert_close(model(ids).logits, dense)


def test_weights_are_narrow_inside_and_restored_after_an_error(llama):
    space = SearchSpace.from_model(llama)
    masks = _edge_masks(space)
    q1 = llama.model.layers[1].self_attn.q_proj
    seen = []
    handle = q1.register_forward_hook(lambda mod, args, out: seen.append(tuple(mod.weight.shape)))
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad(), subnetwork(llama, space, masks):
        llama(ids)
    kept = int(masks.attn[0, space.attn_slice(1)].sum())
    assert seen == [(kept * 4 * 16, 64)]  # n_rep 4, head_dim 16
    assert q1.weight.shape == (128, 64)

    before = _state(llama)
    boom = llama.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: 1 / 0)  # mid-swap
    with pytest.raises(ZeroDivisionError), torch.no_grad(), subnetwork(llama, space, masks):
        llama(ids)
    boom.remove()
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in _state(llama).items())
    assert llama.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert llama.model.layers[1].self_attn.o_proj.weight.shape == (64, 128)
    assert "forward" not in llama.model.layers[0].self_attn.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())


def test_rejects_several_samples_and_soft_masks(llama):
    space = SearchSpace.from_model(llama)
    with pytest.raises(ValueError, match="one mask sample"):
        with subnetwork(llama, space, UnitMasks.ones(space, 2)):
            pass
    soft = UnitMasks.ones(space)
    soft.mlp[0, 3] = 0.5
    with pytest.raises(ValueError, match="0/1"):
        with subnetwork(llama, space, soft):
            pass


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_sample_losses_batched_one_by_one_and_gathered_agree(model_type):
    overrides = dict(ARCH_CASES)[model_type] if model_type == "gemma2" else {}
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    masks = _bernoulli(space, 0.5, 4, seed=11)
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
        config = SearchConfig(sparsity=0.5, steps=3, batch_size=4, max_epochs=2, init="random", init_batches=1,
                              execution=execution)
        results.append(PolicyGradientSearch(llama, blocks, config).run(progress=False))
    torch.testing.assert_close(results[0].history["loss"], results[1].history["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].probs.mlp, results[1].probs.mlp, rtol=1e-4, atol=1e-6)


def test_config_validates_execution():
    with pytest.raises(ValueError, match="execution"):
        SearchConfig(execution="sparse")


def test_bench_command_measures_and_reports(tmp_path, monkeypatch, capsys):
    from pg_pruning_plugin.evaluation import speed as benchmarking
    from pg_pruning_plugin.cli import main

    monkeypatch.setitem(benchmarking.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, vocab_size=200, max_position_embeddings=64))
    out = tmp_path / "speed.md"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--batch-size", "2", "--seq-len", "8",
            "--prompt-len", "4", "--new-tokens", "3", "--sparsities", "0.5", "--gen-batch-sizes", "1", "2",
            "--round-to", "8", "--results-dir", str(tmp_path / "runs"), "--out", str(out)]
    assert main([*argv, "--sample-sparsity", "1.5"]) == 2
    assert "sparsities must be in (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--skip", "memory"]) == 0
    (result_file,) = (tmp_path / "runs").glob("*.json")
    result = json.loads(result_file.read_text())
    seconds = result["search"]["seconds"]
    assert seconds["dense forward"] > 0 and "search step (2 samples), gather" in seconds
    rows = {(r["sparsity"], r["batch_size"]): r for r in result["inference"]}
    assert set(rows) == {(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)}
    assert rows[0.5, 1]["params"] < rows[0.0, 1]["params"] and rows[0.5, 1]["mlp_channels"] == 64
    assert rows[0.5, 1]["kv_groups"] == 2 and all(not r["decode_tok_s"] <= 0 for r in rows.values())  # NaN: lost in timing noise
    report = out.read_text()
    assert "| search step (2 samples), gather |" in report and "| 50% | 2 |" in report
