"""PolicyGradientPruningModifier inside real llmcompressor ``oneshot`` runs on a tiny random Llama (CPU).

Every shipped recipe is run end to end (search, removal, quantization, compressed save), then the
saved checkpoint is reloaded and compared with the in-memory model. Search settings are shrunk
(few steps, small batches) through the same YAML the recipes use.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml
from compressed_tensors.offload import OffloadCache, set_onload_device
from llmcompressor import oneshot
from llmcompressor.core import State
from llmcompressor.modifiers import ModifierFactory
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from pg_pruning_plugin import (
    BudgetError,
    ResumeError,
    SearchConfig,
    SearchResult,
    SearchSpace,
    UnitValues,
    UnsupportedArchitectureError,
    load_pruned,
    prune_model,
)
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.core.removal import RemovedAttention, RemovedMLP
from pg_pruning_plugin.integrations.llmcompressor import (
    PolicyGradientPruningModifier,
    RecipeOrderError,
    quantizable_masks,
    search_batches,
    write_pruned_config,
)
from pg_pruning_plugin.integrations.llmcompressor import modifier as modifier_module
from pg_pruning_plugin.refit import refit
from pg_pruning_plugin.reporting import REPORT_FILE
from tests.helpers import QUANT_TINY, QUANT_VOCAB, RECIPES, fast_recipe


def _oneshot(llmc_dir, llmc_calib, recipe, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(llmc_dir, dtype=torch.float32)
    oneshot(model=model, processor=PreTrainedTokenizerFast.from_pretrained(llmc_dir), dataset=llmc_calib, recipe=recipe,
            num_calibration_samples=len(llmc_calib), max_seq_length=32, shuffle_calibration_samples=False, **kwargs)
    return model


def _widths(model) -> list[tuple[int, int]]:
    return [(layer.self_attn.o_proj.in_features, layer.mlp.down_proj.in_features) for layer in model.model.layers]


PROBE = torch.arange(3, 3 + 24).view(2, 12)


# ------------------------------------------------------------------------------------------ recipes

@pytest.mark.parametrize("recipe, overrides, group_size", [
    ("pg_prune.yaml", {}, None),
    ("pg_prune_gptq_w4a16.yaml", {"attn_sparsity": 0.3}, 128),  # 3 of 4 KV groups: 192 columns -> 4 groups
    ("pg_prune_gptq_w4a16_g64.yaml", {}, 64),
    ("pg_prune_fp8_dynamic.yaml", {"global_budget": True}, None),  # compressed with per-layer widths
    ("pg_prune_w8a8.yaml", {}, None),
])
def test_recipe_prunes_quantizes_saves_and_reloads(llmc_dir, llmc_calib, tmp_path, recipe, overrides, group_size):
    text = fast_recipe(recipe, **overrides)
    fields = yaml.safe_load(text)["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]
    allocation = fields["preset"] == "allocation"
    model = _oneshot(llmc_dir, llmc_calib, text)
    widths = _widths(model)
    assert all(o < 8 * 32 for o, _ in widths) or all(d < 512 for _, d in widths)  # something was removed
    if not allocation:
        assert sum(d for _, d in widths) <= 2 * 512 * 0.75  # about 30 % of the MLP channels went
    if group_size:
        assert all(o % group_size == 0 and d % group_size == 0 for o, d in widths), widths
    quantized = recipe != "pg_prune.yaml"
    assert hasattr(model.model.layers[0].mlp.down_proj, "quantization_scheme") == quantized

    with torch.no_grad():
        expected = model(PROBE).logits
    out = tmp_path / "out"
    model.save_pretrained(out, save_compressed=True)

    saved = json.loads((out / "config.json").read_text())
    assert [(w["num_attention_heads"] * 32, w["intermediate_size"]) for w in saved["pruned_layers"]] == widths
    assert ("quantization_config" in saved) == quantized
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["group_sizes"] == ([group_size] if group_size else [])
    assert report["kept_per_layer"] == [{"q_heads": o // 32, "kv_heads": o // 64, "mlp": d} for o, d in widths]
    assert report["refit"]["method"] == fields["refit"] == "lstsq" and report["refit"]["tokens"] > 0
    if allocation:  # one budget: 30 % of the prunable parameters, split between KV groups and channels by the search
        prunable = report["accounting"]["prunable_params"]
        assert prunable["kept"] <= prunable["requested"] == pytest.approx(0.7 * prunable["dense"], rel=1e-3)

    reloaded = load_pruned(out)
    assert _widths(reloaded) == widths
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    uniform = not fields.get("global_budget", True)
    if uniform:  # one width in every layer: stock from_pretrained reads the standard config fields
        assert len(set(widths)) == 1 and QUANT_TINY["hidden_size"] % (widths[0][0] // 32) == 0
        assert saved["intermediate_size"] == widths[0][1] and saved["num_attention_heads"] * 32 == widths[0][0]
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert _widths(stock) == widths
        with torch.no_grad():
            torch.testing.assert_close(stock(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    elif not allocation:
        assert len(set(widths)) > 1  # the global budget gave per-layer widths; load_pruned read them


def test_model_offloaded_before_oneshot_and_head_count_llama_rejects(llmc_dir, llmc_calib, tmp_path):
    """Torch-Pruning assigns new Parameters, which compressed-tensors' offload cache accepts.

    3 of 4 KV groups leave 6 query heads, which LlamaConfig refuses with hidden size 128: the saved
    config keeps the original head counts and load_pruned builds the layers from pruned_layers.
    """
    model = AutoModelForCausalLM.from_pretrained(llmc_dir, dtype=torch.float32)
    set_onload_device(model, "cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj._parameters, OffloadCache)
    oneshot(model=model, processor=PreTrainedTokenizerFast.from_pretrained(llmc_dir), dataset=llmc_calib,
            recipe=fast_recipe("pg_prune_fp8_dynamic.yaml", attn_sparsity=0.3), num_calibration_samples=len(llmc_calib),
            max_seq_length=32, shuffle_calibration_samples=False)
    widths = _widths(model)
    assert widths == [(6 * 32, widths[0][1])] * 2 and widths[0][1] < 512
    with torch.no_grad():
        expected = model(PROBE).logits
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_attention_heads"] == 8 and [w["num_attention_heads"] for w in saved["pruned_layers"]] == [6, 6]
    assert saved["intermediate_size"] == widths[0][1]  # the kept width, valid whatever the head count
    reloaded = load_pruned(tmp_path / "out")
    assert _widths(reloaded) == widths
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, expected, rtol=1e-4, atol=1e-4)


def test_resume_reuses_a_finished_search(llmc_dir, llmc_calib, tmp_path):
    state = tmp_path / "search.pt"
    first = _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune.yaml", checkpoint_path=str(state)))
    assert state.is_file()
    again = _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune.yaml", checkpoint_path=str(state)))
    assert _widths(again) == _widths(first)
    with pytest.raises(ResumeError, match="another model, calibration set or configuration"):
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune.yaml", checkpoint_path=str(state), sparsity=0.5))


# ------------------------------------------------------------------------------- blocks, cost budget

# One parameter budget (no per-type sparsities). On 4 layers a depth budget of 0.7 must delete a layer:
# keeping one block in every layer keeps at least the 4 attention blocks, a third of the parameters.
DEPTH = {"attn_sparsity": None}


@pytest.mark.parametrize("recipe, overrides", [
    ("pg_prune_depth.yaml", {}),  # width+depth, params, sparsity 0.3
    ("pg_prune_depth.yaml", {"granularity": "depth", "sparsity": 0.7}),
    ("pg_prune_depth.yaml", {"granularity": "width+depth", "cost": "flops", "cost_seq_len": 64, "sparsity": 0.6}),
    ("pg_prune_gptq_w4a16.yaml", {"granularity": "width+depth", "sparsity": 0.6, "global_budget": True}),
], ids=["width+depth", "depth", "flops", "gptq-w4a16"])
def test_block_recipe_prunes_saves_and_reloads(llmc_deep_dir, llmc_calib, tmp_path, recipe, overrides):
    out = tmp_path / "out"
    text = fast_recipe(recipe, **DEPTH | overrides)
    quantized = recipe != "pg_prune_depth.yaml"
    if quantized:  # saving compresses the in-memory weights: take the logits first
        model = _oneshot(llmc_deep_dir, llmc_calib, text)
        with torch.no_grad():
            expected = model(PROBE).logits
        model.save_pretrained(out, save_compressed=True)
    else:  # oneshot's own save (output_dir), as pg-prune recipe uses it
        model = _oneshot(llmc_deep_dir, llmc_calib, text, output_dir=str(out))
        with torch.no_grad():
            expected = model(PROBE).logits
    report = json.loads((out / REPORT_FILE).read_text())
    config = PolicyGradientPruningModifier(
        **yaml.safe_load(text)["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]).search_config()
    requested_kept = (1 - config.sparsity) * report["cost_budget"]["dense"]
    assert report["cost_budget"]["requested_kept"] == pytest.approx(requested_kept)
    if not quantized:  # no rounding: the final mask never exceeds the budget
        assert report["cost_budget"]["kept"] <= requested_kept + 1e-6
    assert report["summary"].startswith(f"cost budget ({config.cost}, granularity {config.granularity})")
    accounting = report["accounting"]
    assert set(accounting["removed_by"]) == {"blocks", "kv_groups", "channels"}
    assert accounting["seq_len_for_flops"] == config.cost_seq_len
    kept = accounting["prunable_params" if config.cost == "params" else "flops_per_token"]
    assert kept["requested"] == pytest.approx(requested_kept) and kept["kept"] == pytest.approx(
        report["cost_budget"]["kept"])

    # report rows cover the 4 original layers; the model keeps the ones with a block left
    rows = report["kept_per_layer"]
    deleted = report["removed_blocks"]["deleted_layers"]
    assert len(rows) == 4 and deleted == [i for i, r in enumerate(rows) if r["kv_heads"] == r["mlp"] == 0]
    survivors = [r for i, r in enumerate(rows) if i not in deleted]
    layers = model.model.layers
    assert len(layers) == len(survivors) == model.config.num_hidden_layers
    for layer, row in zip(layers, survivors):
        assert isinstance(layer.self_attn, RemovedAttention) == (row["kv_heads"] == 0)
        assert isinstance(layer.mlp, RemovedMLP) == (row["mlp"] == 0)
        if row["kv_heads"]:
            assert layer.self_attn.o_proj.in_features == row["q_heads"] * 32
            assert not quantized or layer.self_attn.o_proj.in_features % 128 == 0
        if row["mlp"]:
            assert layer.mlp.down_proj.in_features == row["mlp"]
            assert not quantized or row["mlp"] % 128 == 0
            assert hasattr(layer.mlp.down_proj, "quantization_scheme") == quantized
    for name, module in model.named_modules():  # stand-ins carry no weights and nothing quantized
        if isinstance(module, (RemovedAttention, RemovedMLP)):
            assert not list(module.parameters()) and not hasattr(module, "quantization_scheme"), name
    if overrides.get("granularity") == "depth":
        assert deleted and all(r["mlp"] in (0, 512) and r["kv_heads"] in (0, 4) for r in rows)

    saved = json.loads((out / "config.json").read_text())  # oneshot saved through the patched save_pretrained
    assert saved["num_hidden_layers"] == len(layers) and len(saved["pruned_layers"]) == len(layers)
    assert ("quantization_config" in saved) == quantized
    reloaded = load_pruned(out)
    assert len(reloaded.model.layers) == len(layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, expected, rtol=1e-4, atol=1e-4)


def test_quantizable_masks_keep_blocks_and_skip_removed_widths(llmc_deep_dir):
    """Rounding for group sizes keeps block masks and leaves the widths of removed blocks alone."""
    model = AutoModelForCausalLM.from_pretrained(llmc_deep_dir)
    space = SearchSpace.from_model(model)
    g = torch.Generator().manual_seed(0)
    probs = UnitValues(torch.rand(space.num_attn_units, generator=g), torch.rand(space.num_mlp_units, generator=g),
                       torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    masks = UnitValues((probs.attn > 0.5).float(), (probs.mlp > 0.5).float(), probs.attn_blocks.clone(),
                       probs.mlp_blocks.clone())
    masks.attn[space.attn_slice(1)] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # removed block: left as it is
    result = SearchResult(probs=probs, masks=masks, space=space, config=SearchConfig(preset="authors",
                                                                                     granularity="depth"))
    rounded = quantizable_masks(result, attn_multiple=2, mlp_multiple=128)
    assert torch.equal(rounded.attn_blocks, masks.attn_blocks) and torch.equal(rounded.mlp_blocks, masks.mlp_blocks)
    assert rounded.attn[space.attn_slice(1)].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.equal(rounded.mlp[space.mlp_slice(2)], masks.mlp[space.mlp_slice(2)])
    for i in (0, 2, 3):
        assert int(rounded.attn[space.attn_slice(i)].sum()) % 2 == 0
    for i in (0, 1, 3):
        assert int(rounded.mlp[space.mlp_slice(i)].sum()) % 128 == 0


@pytest.mark.parametrize("fields, message", [
    ({"granularity": "layers"}, r"granularity='layers'; choose one of width, depth, width\+depth"),
    ({"cost": "memory"}, r"cost='memory'; choose one of params, flops, custom"),
    ({"cost": "custom"}, "custom costs need exactly the keys 'attn'"),
    ({"cost": "custom", "custom_costs": {"attn": 0, "mlp": 1}}, "attn unit is 0.0; every unit type needs a positive"),
    ({"cost": "custom", "custom_costs": {"attn": 1, "mlp": -2}}, "mlp unit is -2.0; every unit type needs a positive"),
    ({"cost": "custom", "custom_costs": {"attn": 1, "mlp": "cheap"}}, r"custom_costs\.mlp"),
    ({"cost": "params", "custom_costs": {"attn": 1, "mlp": 1}}, "custom_costs is only read with cost: custom"),
    ({"cost": "flops", "cost_seq_len": 0}, "cost_seq_len must be a positive"),
    ({"granularity": "depth", "attn_sparsity": 0.5}, "one cost budget has one ratio"),
    ({"granularity": "width+depth", "global_budget": False}, "a cost budget is one global budget"),
])
def test_block_and_cost_fields_are_validated_when_the_recipe_is_parsed(fields, message):
    with pytest.raises(ValidationError, match=message):
        PolicyGradientPruningModifier(preset="authors", **fields)  # the units policy's fields
    text = yaml.safe_load((RECIPES / "pg_prune_depth.yaml").read_text())
    text["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"].update(fields)
    with pytest.raises(ValidationError, match=message):
        Recipe.create_instance(yaml.safe_dump(text))


def test_valid_block_and_cost_fields():
    config = PolicyGradientPruningModifier(cost="custom", custom_costs={"attn": 2, "mlp": 0.5}).search_config()
    assert config.cost == "custom" and config.custom_costs == {"attn": 2.0, "mlp": 0.5}
    assert PolicyGradientPruningModifier(preset="authors", granularity="depth").search_config().cost == "params"
    (modifier,) = Recipe.create_instance((RECIPES / "pg_prune_depth.yaml").read_text()).modifiers
    assert (modifier.granularity, modifier.cost, modifier.cost_seq_len) == ("width+depth", "params", 2048)


def test_unreachable_budget_fails_before_the_search(llmc_dir, llmc_calib, monkeypatch):
    monkeypatch.setattr(modifier_module, "PolicyGradientSearch", _no_search)
    # 2 layers: at least one attention block (1/6 of the parameters) must stay
    with pytest.raises(BudgetError, match=r"reachable: sparsity in \(0, 0\.8333\]"):
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_depth.yaml", granularity="depth", sparsity=0.9, **DEPTH))
    with pytest.raises(_SearchStarted):
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_depth.yaml", granularity="depth", sparsity=0.8, **DEPTH))


def test_write_pruned_config_restores_layer_count(llmc_deep_dir, tmp_path):
    """llmcompressor saves the original config.json: the layer count and per-layer widths are written back."""
    model = AutoModelForCausalLM.from_pretrained(llmc_deep_dir)
    space = SearchSpace.from_model(model)
    masks = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    prune_model(model, masks)
    (tmp_path / "config.json").write_text((llmc_deep_dir / "config.json").read_text())
    write_pruned_config(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    assert [w["num_key_value_heads"] for w in saved["pruned_layers"]] == [4, 0, 4]


# ---------------------------------------------------------------------------------------- bad input

def test_registered_with_the_factory():
    assert ModifierFactory._registered_registry["PolicyGradientPruningModifier"] is PolicyGradientPruningModifier


def test_fields_are_those_of_the_search_config():
    fields = PolicyGradientPruningModifier.model_fields
    for f in dataclasses.fields(SearchConfig):
        assert f.name in fields and fields[f.name].default == f.default, f.name
    assert set(fields) - {f.name for f in dataclasses.fields(SearchConfig)} >= {"seq_len", "checkpoint_path"}


def test_misspelled_field_names_the_field():
    text = fast_recipe("pg_prune.yaml").replace("sparsity: 0.3", "sparsty: 0.3")
    with pytest.raises(ValidationError, match=r"sparsty\s+Extra inputs are not permitted"):
        Recipe.create_instance(text)
    with pytest.raises(ValidationError, match="init="):
        PolicyGradientPruningModifier(init="wanda")
    with pytest.raises(ValidationError, match="sparsity"):
        PolicyGradientPruningModifier(sparsity=1.2)


def test_quantization_before_pruning_is_refused(llmc_dir, llmc_calib):
    recipe = yaml.safe_load(fast_recipe("pg_prune_gptq_w4a16.yaml"))
    recipe = {"quant_stage": recipe["quant_stage"], "pruning_stage": recipe["pruning_stage"]}
    with pytest.raises(RecipeOrderError, match="Move PolicyGradientPruningModifier first"):
        _oneshot(llmc_dir, llmc_calib, yaml.safe_dump(recipe, sort_keys=False))


class _SearchStarted(AssertionError):
    pass


def _no_search(*args, **kwargs):
    raise _SearchStarted("the search started")


def test_impossible_group_size_fails_before_the_search(llmc_dir, llmc_calib, monkeypatch):
    monkeypatch.setattr(modifier_module, "PolicyGradientSearch", _no_search)
    recipe = fast_recipe("pg_prune_gptq_w4a16_g64.yaml").replace("group_size: 64", "group_size: 96")
    with pytest.raises(ValueError, match="group size 96.*hidden size 128"):
        _oneshot(llmc_dir, llmc_calib, recipe)
    with pytest.raises(ValueError, match="multiples of 1024.*only 512 channels"):
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_gptq_w4a16.yaml", round_to=1024))
    with pytest.raises(_SearchStarted):  # the sentinel works: a valid recipe reaches the search
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_gptq_w4a16_g64.yaml"))


def test_the_modifier_refits_as_the_core_refit_does(llmc_dir, llmc_calib, monkeypatch):
    """Inside oneshot the final masks are refitted on the search batches and then removed: the pruned
    model has the weights of ``refit`` + ``prune_model`` on the same masks and batches, not the unrefitted ones."""
    seen = {}

    def recording_refit(model, masks, batches, method, **kwargs):
        seen.update(masks=masks, batches=batches, method=method, kwargs=kwargs)
        return refit(model, masks, batches, method, **kwargs)

    monkeypatch.setattr(modifier_module, "refit", recording_refit)
    original = AutoModelForCausalLM.from_pretrained(llmc_dir, dtype=torch.float32)
    model = _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune.yaml"))
    assert seen["method"] == "lstsq" and seen["kwargs"] == {"damping": 0.01}
    expected, unrefitted = copy.deepcopy(original), copy.deepcopy(original)
    refit(expected, seen["masks"], seen["batches"], "lstsq", damping=0.01)
    prune_model(expected, seen["masks"])
    prune_model(unrefitted, seen["masks"])
    got = model.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(got[down], unrefitted.state_dict()[down])


def test_no_calibration_data(llmc_dir, monkeypatch):
    monkeypatch.setattr(modifier_module, "PolicyGradientSearch", _no_search)
    model = AutoModelForCausalLM.from_pretrained(llmc_dir)
    with pytest.raises(ValueError, match="needs calibration data.*dataset="):
        oneshot(model=model, recipe=fast_recipe("pg_prune.yaml"))


def test_unsupported_architecture_fails_first(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=QUANT_VOCAB))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        PolicyGradientPruningModifier(steps=2).initialize(State(model=gpt2))  # no data given: arch is checked first
    # the command line checks the config alone: no weights exist to load
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    gpt2.config.save_pretrained(model_dir)
    code = main(["recipe", str(RECIPES / "pg_prune.yaml"), "--model", str(model_dir), "--output",
                 str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- calibration

def test_search_batches_remove_padding_cut_blocks_and_regroup():
    loader = [
        {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])},
        {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 1, 1, 1],
                                                                                              [1, 1, 1, 1]])},
    ]
    batches = search_batches(loader, batch_size=2, seq_len=2)
    # rows: [5 6] [7 8] (tail 9 dropped), [1 2] (tail 3 dropped), [4 5] [6 7] -> 5 blocks, 2 full batches
    assert [b["input_ids"].tolist() for b in batches] == [[[5, 6], [7, 8]], [[1, 2], [4, 5]]]
    whole = search_batches(loader, batch_size=3)
    assert whole[0]["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0], [4, 5, 6, 7, 0]]
    assert whole[0]["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="no sequence"):
        search_batches([{"input_ids": torch.tensor([[1]])}], batch_size=1)
