"""Torch-Pruning habits with the importance swapped in: the flow of Torch-Pruning's own LLM example
(``examples/LLMs/prune_llm.py`` at v1.6.1: ``MetaPruner`` with a tensor of token ids, the stock per-head
``num_heads``, ``prune_num_heads``, ``head_pruning_ratio``, ``round_to=4``, no tracing context), and a plain
``pruner.step()`` on a hand-built pruner. Checked against the masked original (torch_pruning.md §5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch_pruning as tp

from pg_pruning_plugin import SearchSpace, UnitMasks, load_pruned, masked, save_pruned
from pg_pruning_plugin.integrations.torch_pruning import PolicyGradientImportance, prune_step, unwrapped_parameters
from tests.helpers import greedy, synthetic_result, tiny_model

IDS = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(3))


def example_model():
    return tiny_model("llama", hidden_size=48, intermediate_size=96, num_attention_heads=12, num_key_value_heads=4,
                      head_dim=8)


def example_pruner(model, importance, global_pruning: bool = False, ratio: float = 0.5):
    """``prune_llm.py``'s pruner, line for line (its ``tokenizer.encode("Hello world.")`` is 6 token ids)."""
    inputs = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    num_heads = {}
    out_channel_groups = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    return tp.pruner.MetaPruner(
        model, example_inputs=inputs, importance=importance, global_pruning=global_pruning,
        output_transform=lambda x: x.logits, pruning_ratio=ratio, ignored_layers=[model.lm_head],
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        out_channel_groups=out_channel_groups, round_to=4,
    )


def example_attribute_updates(model) -> None:
    """``prune_llm.py``'s updates after pruning (written for transformers <= 4.48), as written (GQA model)."""
    model.config.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features
            m.num_heads = m.hidden_size // m.head_dim
            model.config.num_attention_heads = m.num_heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = m.num_heads // model.config.num_key_value_heads
        elif name.endswith("mlp"):
            m.hidden_size = m.gate_proj.in_features
            model.config.intermediate_size = m.gate_proj.out_features


def assert_matches_masked(pruned, original, importance) -> None:
    kept = importance.ledger.kept_masks()
    with torch.no_grad():
        with masked(original, SearchSpace.from_model(original), UnitMasks(kept.attn, kept.mlp)):
            ref = original(IDS).logits
            ref_tokens = greedy(original, IDS[:1])
        torch.testing.assert_close(pruned(IDS).logits, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(greedy(pruned, IDS[:1]), ref_tokens)


@pytest.mark.parametrize("global_pruning", [False, True], ids=["as-written", "global"])
def test_torch_pruning_llm_example_with_the_importance_swapped_in(global_pruning, tmp_path):
    base = example_model()
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, global_pruning), model)
    pruner = example_pruner(model, importance, global_pruning)  # traces (eager, no cache) instead of hanging
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache  # restored after tracing

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"Replace the step by `prune_step\(pruner\)`.*Nothing was pruned"):
        for g in pruner.step(interactive=True):  # the example's loop
            g.prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and pruner.current_step == 0

    report = prune_step(pruner)  # the one line that replaces the loop
    if not global_pruning:
        example_attribute_updates(model)  # harmless after prune_step; for global widths it would be wrong
    assert report.kv_groups_removed == 6 and all(m % 4 == 0 for _, m in report.kept_per_layer)  # round_to=4
    if global_pruning:
        assert len(set(report.kept_per_layer)) > 1
    else:
        assert report.kept_per_layer == [(2, 48)] * 3
    assert_matches_masked(model, base, importance)
    save_pruned(model, tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "pruned")(IDS).logits, model(IDS).logits)


def test_plain_step_of_a_hand_built_pruner_is_refused_before_pruning():
    model = example_model()
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    layers = model.model.layers
    pruner = tp.pruner.BasePruner(  # docs/torch_pruning.md's hand-built pruner, without any context
        model, torch.randint(0, 200, (1, 8)), importance=importance, global_pruning=True, pruning_ratio=0.5,
        pruning_ratio_dict={tuple(layer.mlp for layer in layers): 0.25},
        num_heads={m: 4 for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj)},
        prune_num_heads=True, head_pruning_ratio=0.5, prune_head_dims=False,
        ignored_layers=[model.model.embed_tokens, model.lm_head], output_transform=lambda out: out.logits)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="prune_step"):
        pruner.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and pruner.current_step == 0
    assert prune_step(pruner).kv_groups_removed == 6


def test_unwrapped_parameters_silences_torch_pruning():
    model = example_model()
    PolicyGradientImportance(synthetic_result(model, True), model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.DependencyGraph().build_dependency(model, example_inputs=torch.randint(0, 200, (1, 8)),
                                              output_transform=lambda out: out.logits,
                                              unwrapped_parameters=unwrapped_parameters(model))
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    assert {id(p) for p, _ in unwrapped_parameters(model)} == {id(p) for n, p in model.named_parameters()
                                                               if "norm" in n}
