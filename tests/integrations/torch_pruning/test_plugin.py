"""PolicyGradientImportance with stock Torch-Pruning pruners, build_pruner, and bad input.

A tiny random Llama with 12 query / 4 KV heads (n_rep 3) and 3 layers. Every pruned model is
checked against the masked original (torch_pruning.md §5), so a wrong coupling cannot pass.
Results that remove whole blocks under one cost budget (depth granularities) run on the tiny Llama
GQA and Gemma 3 models of tests/helpers.py: the pruned model must keep exactly the search's
masks, generate with the KV cache like the masked original, and round-trip through save/load.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch_pruning as tp
from transformers import LlamaForCausalLM

from pg_pruning_plugin import (
    PolicyGradientSearch,
    SearchConfig,
    SearchResult,
    SearchSpace,
    UnitMasks,
    UnitValues,
    hard_masks,
    load_pruned,
    masked,
    prune_model,
    save_pruned,
)
from pg_pruning_plugin.core.removal import RemovedAttention, RemovedMLP
from pg_pruning_plugin.integrations.torch_pruning import (
    GroupLayoutError,
    PolicyGradientImportance,
    StepRefit,
    build_pruner,
    dependency_graph,
    kv_group_heads,
    prune_step,
    tracing_inputs,
    tracing_mode,
    unwrapped_parameters,
)
from pg_pruning_plugin.refit import refit
from pg_pruning_plugin.search.costs import unit_costs
from tests.helpers import REPO, greedy, synthetic_result, tiny_model

IDS = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(3))
_ORIGINAL_CHECK = tp.DependencyGraph.check_pruning_group


def tiny_llama(num_layers: int = 3, intermediate: int = 96, heads: int = 12, kv: int = 4, head_dim: int = 8,
               hidden: int = 48) -> LlamaForCausalLM:
    return tiny_model("llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


def assert_matches_masked(pruned, original, importance: PolicyGradientImportance) -> None:
    kept = importance.ledger.kept_masks()
    with torch.no_grad():
        with masked(original, SearchSpace.from_model(original), UnitMasks(kept.attn, kept.mlp)):
            ref = original(IDS).logits
        assert (ref - original(IDS).logits).abs().max() > 1e-3
        torch.testing.assert_close(pruned(IDS).logits, ref, rtol=1e-4, atol=1e-5)


def widths(model) -> list[tuple[int, int]]:
    return [(s.num_kv_groups, s.intermediate_size) for s in SearchSpace.from_model(model).layers]


def root_scores(model, importance) -> dict[tuple[int, str], torch.Tensor | None]:
    """``importance`` of every Linear-rooted group of ``model``, keyed by (layer, root projection name)."""
    graph = dependency_graph(model)
    scores = {}
    for group in graph.get_all_groups(ignored_layers=[model.lm_head, model.model.embed_tokens],
                                      root_module_types=[torch.nn.Linear]):
        name = re.search(r"layers\.(\d+)\.\w+\.(\w+)", group[0].dep.target.name)
        scores[(int(name[1]), name[2])] = importance(group)
    return scores


# -- the importance on its own ---------------------------------------------------------------
def test_scores_follow_the_group_layout(base):
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    roots = root_scores(model, importance)
    graph = dependency_graph(model)
    for layer in range(3):
        attn, mlp = importance.unit_scores("attn", layer), importance.unit_scores("mlp", layer)
        assert torch.equal(roots[(layer, "q_proj")], attn.repeat_interleave(3 * 8))  # n_rep·head_dim per KV group
        assert torch.equal(roots[(layer, "up_proj")], mlp)
        assert roots[(layer, "k_proj")] is None and roots[(layer, "v_proj")] is None  # k/v alone: never
        o_proj = model.model.layers[layer].self_attn.o_proj
        rerooted = graph.get_pruning_group(o_proj, tp.prune_linear_in_channels, list(range(o_proj.in_features)))
        assert torch.equal(importance(rerooted), roots[(layer, "q_proj")])  # BasePruner's attention root
        # the best unit of every layer is lifted above all others (never emptied by global ranking)
        assert attn.max() >= 12 and (attn >= 12).sum() == 1 and (mlp >= 288).sum() == 1
    residual = next(iter(graph.get_all_groups(ignored_layers=[model.lm_head], root_module_types=[torch.nn.Embedding])))
    assert importance(residual) is None  # the hidden size is not ours


# -- stock BasePruner with our importance ------------------------------------------------------
STOCK_CASES = {
    "global": dict(global_pruning=True),
    "local": dict(global_pruning=False),
    "round_to": dict(global_pruning=True, round_to=8),
    "ignored_layer": dict(global_pruning=True, ignore_layer=1),
    "iterative": dict(global_pruning=True, iterative_steps=3),
}


def stock_pruner(model, importance, global_pruning, round_to=None, iterative_steps=1, ignore_layer=None):
    """A plain ``tp.pruner.BasePruner`` configured as a Torch-Pruning user would, with the KV-group trick."""
    layers = model.model.layers
    ignored = [model.model.embed_tokens, model.lm_head]
    if ignore_layer is not None:
        ignored += [layers[ignore_layer].self_attn, layers[ignore_layer].mlp]
    mlps = tuple(layer.mlp for i, layer in enumerate(layers) if i != ignore_layer)
    return tp.pruner.BasePruner(  # no tracing context: the importance makes Torch-Pruning trace eagerly, no cache
        model, IDS[:1], importance=importance, global_pruning=global_pruning,
        pruning_ratio=0.5, pruning_ratio_dict={mlps: 0.25}, num_heads=kv_group_heads(model),
        prune_num_heads=True, head_pruning_ratio=0.5, prune_head_dims=False, round_to=round_to,
        iterative_steps=iterative_steps, ignored_layers=ignored, output_transform=lambda out: out.logits,
        unwrapped_parameters=unwrapped_parameters(model),
    )


@pytest.mark.parametrize("case", STOCK_CASES)
def test_stock_base_pruner(base, case):
    options = STOCK_CASES[case]
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, options["global_pruning"]), model)
    pruner = stock_pruner(model, importance, **options)
    for _ in range(options.get("iterative_steps", 1)):
        prune_step(pruner, importance)
    assert "check_pruning_group" not in pruner.DG.__dict__  # our check was scoped to the step
    assert_matches_masked(model, base, importance)
    got = widths(model)
    if case in ("global", "iterative"):  # 12 → 6 KV groups and 288 → 216 channels, ranked over all layers
        assert sum(a for a, _ in got) == 6 and sum(m for _, m in got) == 216 and len(set(got)) > 1
    elif case == "local":
        assert got == [(2, 72)] * 3
    elif case == "round_to":
        assert all(m % 8 == 0 for _, m in got) and sum(a for a, _ in got) == 6
    else:
        assert got[1] == (4, 96) and sum(a for a, _ in got) == 4 + 4 and sum(m for _, m in got) == 96 + 144
    if case == "iterative":  # scores stayed keyed by original ids while indices shifted
        one_shot = copy.deepcopy(base)
        reference = PolicyGradientImportance(importance.result, one_shot)
        prune_step(stock_pruner(one_shot, reference, True), reference)
        assert torch.equal(importance.ledger.kept_masks().attn, reference.ledger.kept_masks().attn)
        assert torch.equal(importance.ledger.kept_masks().mlp, reference.ledger.kept_masks().mlp)


# -- build_pruner --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 3])
def test_global_selection_matches_core_engine(base, seed):
    # seed 1: the plain global top-k would leave a layer without a KV group; both the core's hard_masks
    # and the plugin reserve each layer's best group inside the budget. seed 3: it would not.
    result = synthetic_result(base, True, seed=seed)
    space = result.space
    assert result.masks.attn.sum() == 12 - 6 and result.masks.mlp.sum() == 288 - int(288 * 0.3)  # exact budget
    plugin, core = copy.deepcopy(base), copy.deepcopy(base)
    importance = PolicyGradientImportance(result, plugin)
    build_pruner(plugin, importance).step()
    kept = importance.ledger.kept_masks()
    assert torch.equal(kept.attn, result.masks.attn) and torch.equal(kept.mlp, result.masks.mlp)
    prune_model(core, result.masks)
    assert plugin.state_dict().keys() == core.state_dict().keys()
    assert all(torch.equal(a, core.state_dict()[k]) for k, a in plugin.state_dict().items())
    assert widths(plugin) != [(s.num_kv_groups, s.intermediate_size) for s in space.layers]


def test_local_and_iterative_build_pruner(base):
    result = synthetic_result(base, False)
    one_shot, stepped = copy.deepcopy(base), copy.deepcopy(base)
    reference = PolicyGradientImportance(result, one_shot)
    build_pruner(one_shot, reference).step()
    assert torch.equal(reference.ledger.kept_masks().attn, result.masks.attn)
    assert torch.equal(reference.ledger.kept_masks().mlp, result.masks.mlp)
    importance = PolicyGradientImportance(result, stepped)
    pruner = build_pruner(stepped, importance, iterative_steps=2)
    reports = [pruner.step(), pruner.step()]
    assert [r.kv_groups_removed for r in reports] == [3, 3]  # 2 of 4 per layer, one per step
    assert [r.channels_removed for r in reports] == [3 * 14, 3 * 14]
    assert torch.equal(importance.ledger.kept_masks().attn, reference.ledger.kept_masks().attn)
    assert torch.equal(importance.ledger.kept_masks().mlp, reference.ledger.kept_masks().mlp)
    assert widths(stepped) == widths(one_shot) == [(2, 68)] * 3
    assert_matches_masked(stepped, base, importance)


CALIBRATION = torch.randint(0, 200, (16, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", ["lstsq", "bias"])
def test_step_refits_the_kept_weights_as_the_core_refit_does(base, method):
    """build_pruner(calibration=...) refits before Torch-Pruning removes: the same weights as
    ``refit(model, masks)`` followed by ``prune_model``, and a smaller reconstruction error than no refit."""
    result = synthetic_result(base, True, seed=3)
    core, unrefit = copy.deepcopy(base), copy.deepcopy(base)
    refit(core, result.masks, CALIBRATION, method)
    prune_model(core, result.masks)
    prune_model(unrefit, result.masks)
    plugin = copy.deepcopy(base)
    build_pruner(plugin, PolicyGradientImportance(result, plugin), refit=method, calibration=CALIBRATION).step()
    assert plugin.state_dict().keys() == core.state_dict().keys()
    for key, value in plugin.state_dict().items():
        torch.testing.assert_close(value, core.state_dict()[key], rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        dense = base(CALIBRATION).logits
        errors = [(m(CALIBRATION).logits - dense).pow(2).mean() for m in (plugin, unrefit)]
    assert errors[0] < errors[1]


def test_iterative_steps_refit_every_step(base):
    result = synthetic_result(base, False)
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(result, model)
    pruner = build_pruner(model, importance, iterative_steps=2, calibration=CALIBRATION)  # refit None: lstsq
    assert pruner.refit_with.resolved() == "lstsq"
    pruner.step()
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.step()
    assert widths(model) == [(2, 68)] * 3
    unrefit = copy.deepcopy(base)
    prune_model(unrefit, importance.ledger.kept_masks())
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    assert after_one[o_proj].shape != model.state_dict()[o_proj].shape
    assert not torch.allclose(model.state_dict()[o_proj], unrefit.state_dict()[o_proj])


def test_refit_without_calibration_is_refused_before_tracing(base, monkeypatch):
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, True, seed=3), model)
    pruner = stock_pruner(model, importance, True)
    with pytest.raises(ValueError, match="needs calibration="):  # before any group is collected
        prune_step(pruner, importance, StepRefit("lstsq"))
    assert widths(model) == widths(base) and pruner.current_step == 0
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", lambda *a, **k: pytest.fail("traced"))
    with pytest.raises(ValueError, match="needs calibration="):
        build_pruner(model, importance, refit="lstsq")
    with pytest.raises(ValueError, match="choose one of"):
        build_pruner(model, importance, refit="ols", calibration=CALIBRATION)


def test_build_pruner_ignored_layers(base):
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, True, seed=3), model)
    build_pruner(model, importance, ignored_layers=[model.model.layers[1]]).step()
    got = widths(model)
    assert got[1] == (4, 96)  # ratios apply to the other layers' 8 KV groups and 192 channels
    assert got[0][0] + got[2][0] == 8 - 4 and got[0][1] + got[2][1] == 192 - int(192 * 0.3)
    assert_matches_masked(model, base, importance)


def test_search_result_file_and_nothing_left_changed(base, tmp_path):
    model = copy.deepcopy(base)
    blocks = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    result = PolicyGradientSearch(model, blocks, SearchConfig(preset="authors", sparsity=0.25, steps=4, batch_size=2,
                                                               init="magnitude")).run(progress=False)
    result.save(tmp_path / "search.pt")
    importance = PolicyGradientImportance(tmp_path / "search.pt", model)
    use_cache = model.config.use_cache
    defaults = [d for d in tp.pruner.BasePruner.__init__.__defaults__ if isinstance(d, dict)]
    before = [dict(d) for d in defaults]
    pruner = build_pruner(model, importance)
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache == use_cache
    pruner.step()
    assert torch.equal(importance.ledger.kept_masks().attn, result.masks.attn)
    assert tp.DependencyGraph.check_pruning_group is _ORIGINAL_CHECK and "check_pruning_group" not in pruner.DG.__dict__
    assert defaults and [dict(d) for d in defaults] == before  # BasePruner's mutable default dicts untouched
    assert_matches_masked(model, base, importance)


def test_n_rep_2_does_not_hang():
    """Torch-Pruning 1.6.1 loops forever on RoPE concats when n_rep == 2 (bug 10)."""
    original = tiny_llama(heads=8, kv=4, head_dim=8, hidden=64)
    model = copy.deepcopy(original)
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    build_pruner(model, importance, iterative_steps=2).step()
    assert_matches_masked(model, original, importance)


# -- bad input -----------------------------------------------------------------------------------
def test_importance_for_another_model_is_refused(base):
    result = synthetic_result(base, True)
    with pytest.raises(ValueError, match="covers 3 layers; the model has 2"):
        PolicyGradientImportance(result, tiny_llama(num_layers=2))
    with pytest.raises(ValueError, match="layer 0: the search result expects .* 96 MLP channels; .* 64 MLP"):
        PolicyGradientImportance(result, tiny_llama(intermediate=64))
    importance = PolicyGradientImportance(result, copy.deepcopy(base))
    other = copy.deepcopy(base)
    group = next(iter(dependency_graph(other).get_all_groups(root_module_types=[torch.nn.Linear])))
    with pytest.raises(ValueError, match="not part of the model this importance was built for"):
        importance(group)
    with pytest.raises(ValueError, match="built for another model object"):
        build_pruner(other, importance)
    prune_model(importance.model, result.masks)  # pruned behind the importance's back
    with pytest.raises(ValueError, match="pruned outside prune_step"):
        build_pruner(importance.model, importance)


def test_unrecognised_group_layout_is_reported(base):
    model = copy.deepcopy(base)
    with torch.enable_grad():  # SDPA tracing before the importance exists: no GQA mapping (torch_pruning.md bug 2)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=tracing_inputs(model),
                                                      output_transform=lambda out: out.logits)
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    attn_roots = [g for g in graph.get_all_groups(ignored_layers=[model.lm_head, model.model.embed_tokens],
                                                  root_module_types=[torch.nn.Linear])
                  if "self_attn" in g[0].dep.target.name]
    with pytest.raises(GroupLayoutError, match="SDPA"):
        for group in attn_roots:
            importance(group)
    pruner = tp.pruner.BasePruner(model, tracing_inputs(model), importance, pruning_ratio=0.5,
                                  num_heads=kv_group_heads(model), prune_num_heads=True, head_pruning_ratio=0.5,
                                  prune_head_dims=True, output_transform=lambda out: out.logits,
                                  ignored_layers=[model.lm_head, model.model.embed_tokens])
    with pytest.raises(ValueError, match="prune_head_dims=False"):
        prune_step(pruner, importance)


def test_budget_that_would_empty_a_layer_is_refused(base):
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(synthetic_result(model, True), model)
    with pytest.raises(ValueError, match=r"removing 286 of 288 MLP channels .*\(layer \d would be emptied\)"):
        build_pruner(model, importance, mlp_ratio=0.995)
    with pytest.raises(ValueError, match="keeps 48 MLP channels of layer 0, which floor_to=64 floors to 0"):
        build_pruner(model, importance, mlp_ratio=0.5, global_pruning=False, floor_to=64)
    with pytest.raises(TypeError, match="floor_to"):  # Torch-Pruning's round_to floors: it has another name here
        build_pruner(model, importance, round_to=64)
    with pytest.raises(TypeError, match="sets num_heads"):
        build_pruner(model, importance, num_heads={})
    before = copy.deepcopy(model.state_dict())
    pruner = stock_pruner(model, importance, global_pruning=False)
    pruner.per_step_head_pruning_ratio[1] = 0.9  # ceil(0.9 · 4) = every KV group of a layer
    with pytest.raises(ValueError, match=r"remove all 96 channels of layer 0 \(o_proj\)"):
        prune_step(pruner, importance)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before pruning
    mha = tiny_llama(heads=4, kv=4, head_dim=16, hidden=64)
    with pytest.raises(ValueError, match="(?s)3 query heads.*rejects.*not a multiple"):  # 64 % 3 != 0
        build_pruner(mha, PolicyGradientImportance(synthetic_result(mha, False), mha), attn_ratio=0.25)


# -- depth (whole blocks) and cost-budget results ------------------------------------------------
# Tiny models with 3 layers, 8 query / 2 KV heads, 96 channels (tests/helpers.py).
BLOCK_ARCHS = {"llama-gqa": ("llama", {}), "gemma3_text": ("gemma3_text", {"head_dim": 32, "sliding_window": 4})}
PLANNED = [(0, "mlp"), (1, "attn"), (1, "mlp")]  # layer 1 loses both blocks and disappears


def block_result(model, granularity: str, cost: str = "params", seed: int = 0) -> SearchResult:
    """A cost-budget result whose hard masks (the budget's hard_mask) remove the PLANNED blocks and, when
    widths are searched too, some KV groups and channels of the kept blocks."""
    space = SearchSpace.from_model(model)
    g = torch.Generator().manual_seed(seed)
    widths = granularity != "depth"

    def width_probs(n: int) -> torch.Tensor:  # below every kept block's probability
        return 0.2 + 0.6 * torch.rand(n, generator=g) if widths else torch.ones(n)

    probs = UnitValues(width_probs(space.num_attn_units), width_probs(space.num_mlp_units),
                       torch.tensor([0.9, 0.05, 0.97]), torch.tensor([0.08, 0.04, 0.95]))
    costs = unit_costs(space, cost, seq_len=128)

    def block(kind: str, layer: int) -> float:
        units = costs.attn[space.attn_slice(layer)] if kind == "attn" else costs.mlp[space.mlp_slice(layer)]
        return float(units.sum())

    total = float(costs.attn.sum() + costs.mlp.sum())
    planned = sum(block(kind, layer) for layer, kind in PLANNED)
    extra = 0.25 * (block("attn", 2) + block("mlp", 2)) if widths else -1.0  # depth: exactly the planned blocks
    config = SearchConfig(preset="authors",
                          sparsity=(planned + extra) / total, granularity=granularity, cost=cost, cost_seq_len=128,
                          steps=1, init="constant")
    return SearchResult(probs, hard_masks(probs, space, config), space, config)


def assert_same_masks(importance: PolicyGradientImportance, masks: UnitValues) -> None:
    """The model keeps exactly what ``masks`` keep (units of removed blocks do not matter)."""
    space, kept = importance.space, importance.ledger.kept_masks()
    assert torch.equal(kept.attn_blocks, masks.attn_blocks) and torch.equal(kept.mlp_blocks, masks.mlp_blocks)
    ours, theirs = UnitMasks(**kept.as_dict()).folded(space), UnitMasks(**masks.as_dict()).folded(space)
    assert torch.equal(ours.attn, theirs.attn) and torch.equal(ours.mlp, theirs.mlp)


@pytest.mark.parametrize("granularity,cost", [("width+depth", "params"), ("width+depth", "flops"), ("depth", "params")])
@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_block_result_reproduces_the_search_masks(arch, granularity, cost, tmp_path):
    model_type, overrides = BLOCK_ARCHS[arch]
    original = tiny_model(model_type, **overrides)
    model = copy.deepcopy(original)
    result = block_result(model, granularity, cost)
    importance = PolicyGradientImportance(result, model)
    assert importance.removed_blocks == PLANNED
    with torch.no_grad():
        with masked(original, result.space, UnitMasks(**result.masks.as_dict())):
            expected, expected_tokens = original(IDS).logits, greedy(original, IDS[:1, :5], tokens=8)
        assert (expected - original(IDS).logits).abs().max() > 1e-3

    report = build_pruner(model, importance).step()  # default ratios: those of result.masks

    assert report.blocks_removed == PLANNED and not importance.ledger.blocks_pending
    assert_same_masks(importance, result.masks)
    if granularity == "depth":
        assert report.kv_groups_removed == report.channels_removed == 0
    else:
        assert report.kv_groups_removed + report.channels_removed > 0
    assert report.kept_per_layer[0][1] == 0 and report.kept_per_layer[1] == (0, 0)
    layers = model.model.layers
    assert model.config.num_hidden_layers == len(layers) == 2
    assert isinstance(layers[0].mlp, RemovedMLP) and not isinstance(layers[0].self_attn, RemovedAttention)
    assert not isinstance(layers[1].mlp, RemovedMLP)  # the original layer 2, renumbered
    if getattr(original.config, "layer_types", None):
        assert model.config.layer_types == [original.config.layer_types[i] for i in (0, 2)]
    assert [s.num_kv_groups == 0 or s.intermediate_size == 0 for s in SearchSpace.from_model(model).layers] == \
        [True, False]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(greedy(model, IDS[:1, :5], tokens=8), expected_tokens)  # generate() with the KV cache
    save_pruned(model, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
        assert torch.equal(greedy(reloaded, IDS[:1, :5], tokens=8), expected_tokens)


def test_importance_skips_the_groups_of_removed_blocks():
    model = tiny_model("llama")
    importance = PolicyGradientImportance(block_result(model, "width+depth"), model)
    scores = root_scores(model, importance)
    for layer in range(3):
        for root, kind in (("q_proj", "attn"), ("up_proj", "mlp")):
            root = root if (layer, root) in scores else "gate_proj"  # gate and up share one group
            assert (scores[(layer, root)] is None) == ((layer, kind) in PLANNED), (layer, kind)
    blocks = model.model.layers
    assert importance.removed_block_modules() == [blocks[0].mlp, blocks[1].self_attn, blocks[1].mlp]
    assert importance.ledger.kept_masks().attn_blocks.tolist() == [1, 1, 1]  # nothing removed yet


def test_iterative_steps_remove_the_blocks_once_at_the_last_step(tmp_path):
    base = tiny_model("llama")
    result = block_result(base, "width+depth", seed=1)
    result.save(tmp_path / "search.pt")
    one_shot, stepped = copy.deepcopy(base), copy.deepcopy(base)
    reference = PolicyGradientImportance(tmp_path / "search.pt", one_shot)
    build_pruner(one_shot, reference).step()
    importance = PolicyGradientImportance(tmp_path / "search.pt", stepped)
    pruner = build_pruner(stepped, importance, iterative_steps=2)
    first = pruner.step()
    assert first.blocks_removed == [] and importance.ledger.blocks_pending and len(stepped.model.layers) == 3
    assert not any(isinstance(m, (RemovedAttention, RemovedMLP)) for m in stepped.modules())
    second = pruner.step()
    assert second.blocks_removed == PLANNED and not importance.ledger.blocks_pending
    kept_attention = result.masks.attn[[0, 1, 4, 5]]  # KV groups of layers 0 and 2, whose attention stays
    assert first.kv_groups_removed + second.kv_groups_removed == 4 - int(kept_attention.sum())
    assert_same_masks(importance, result.masks)
    assert_same_masks(reference, result.masks)
    assert widths(stepped) == widths(one_shot)
    with torch.no_grad():
        torch.testing.assert_close(stepped(IDS).logits, one_shot(IDS).logits, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="exceed the maximum iterative steps"):
        extra = pruner.step()  # Torch-Pruning's own no-op; the blocks are not removed twice
    assert (extra.kv_groups_removed, extra.channels_removed, extra.blocks_removed) == (0, 0, [])
    with pytest.raises(ValueError, match="already deleted"):
        build_pruner(stepped, importance)


@pytest.mark.parametrize("global_pruning", [True, False])
def test_ratios_count_only_the_kept_blocks(global_pruning):
    base = tiny_model("llama")  # 2 KV groups and 96 channels per layer
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(block_result(model, "depth"), model)
    if global_pruning:  # kept: the attention of layers 0 and 2 (4 KV groups), the MLP of layer 2
        with pytest.raises(ValueError, match=r"removing 3 of 4 KV groups .*for 2 layers"):
            build_pruner(model, importance, attn_ratio=0.75)
    build_pruner(model, importance, attn_ratio=0.5, mlp_ratio=0.25, global_pruning=global_pruning).step()
    assert widths(model) == [(1, 0), (1, 72)]  # a quarter of the 96 kept channels (of all 288: 72 of them)
    kept = importance.ledger.kept_masks()
    with torch.no_grad(), masked(base, SearchSpace.from_model(base), UnitMasks(**kept.as_dict())):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=1e-4, atol=1e-5)


def test_hand_built_pruner_must_ignore_the_removed_blocks():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    result = block_result(model, "width+depth")
    importance = PolicyGradientImportance(result, model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"removed layer 0 mlp, layer 1 attn, layer 1 mlp, but the pruner does "
                                         r"not ignore them"):
        prune_step(stock_pruner(model, importance, global_pruning=True), importance)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    layers = model.model.layers
    with tracing_mode(model):
        pruner = tp.pruner.BasePruner(
            model, tracing_inputs(model), importance=importance, global_pruning=True, pruning_ratio=0.5,
            pruning_ratio_dict={(layers[2].mlp,): 0.25}, num_heads=kv_group_heads(model), prune_num_heads=True,
            head_pruning_ratio=0.5, prune_head_dims=False, output_transform=lambda out: out.logits,
            ignored_layers=[model.model.embed_tokens, model.lm_head, *importance.removed_block_modules()])
    report = prune_step(pruner, importance)
    assert report.blocks_removed == PLANNED and model.config.num_hidden_layers == 2
    assert widths(model) == [(1, 0), (1, 72)]  # 2 of the 4 kept KV groups, 24 of the 96 kept channels
    kept = importance.ledger.kept_masks()
    with torch.no_grad(), masked(base, SearchSpace.from_model(base), UnitMasks(**kept.as_dict())):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=1e-4, atol=1e-5)


def test_searched_blocks_end_to_end(tmp_path):
    """A real width+depth search with a FLOPs budget, then the default pruner: the search's masks."""
    base = tiny_model("llama", num_hidden_layers=4)
    blocks = torch.randint(0, 200, (12, 16), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(preset="authors", sparsity=0.5, steps=3, batch_size=4, init="magnitude", init_batches=2,
                          granularity="width+depth", cost="flops", cost_seq_len=128)
    result = PolicyGradientSearch(base, blocks, config).run(progress=False)
    model = copy.deepcopy(base)
    importance = PolicyGradientImportance(result, model)
    build_pruner(model, importance).step()
    assert_same_masks(importance, result.masks)
    with torch.no_grad(), masked(base, result.space, UnitMasks(**result.masks.as_dict())):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=1e-4, atol=1e-5)


# -- docs --------------------------------------------------------------------------------------
DOC = REPO / "docs" / "torch_pruning.md"


@pytest.mark.real_model
@pytest.mark.parametrize("example", [0, 1])  # 0: width search; 1: depth search with a FLOPs budget
def test_docs_example_runs_as_written(example, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2, "docs/torch_pruning.md should hold two python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(blocks[example], str(DOC), "exec"), namespace)
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]  # Torch-Pruning's noise
    pruned = SearchSpace.from_model(namespace["pruned"])
    if example == 0:  # 30 % of the prunable parameters, split between KV groups and channels by the search
        assert pruned.prunable_parameters() <= 0.7 * namespace["result"].space.prunable_parameters()
    else:
        result, importance = namespace["result"], namespace["importance"]
        assert namespace["report"].blocks_removed == importance.removed_blocks != []
        assert_same_masks(importance, result.masks)
        assert pruned.prunable_parameters() < result.space.prunable_parameters()
