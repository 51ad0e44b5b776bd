"""PolicyGradientPruningModifier inside real llmcompressor ``oneshot`` runs on a tiny random Llama (CPU).

Every shipped recipe is run end to end (search, removal, quantization, compressed save), then the
saved checkpoint is reloaded and compared with the in-memory model. Search settings are shrunk
(few steps, small batches) through the same YAML the recipes use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from compressed_tensors.offload import OffloadCache, set_onload_device
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import State
from llmcompressor.modifiers import ModifierFactory
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import pg_pruning_plugin
from pg_pruning_plugin import ResumeError, SearchSpace, UnsupportedArchitectureError, load_pruned
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.integrations import llmcompressor as plugin
from pg_pruning_plugin.integrations.llmcompressor import PolicyGradientPruningModifier, RecipeOrderError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VOCAB = 256
# hidden 128 so the W4A16 preset (group 128) applies; a KV group is 2 x 32 = 64 o_proj columns, so
# group 128 forces an even number of kept KV groups per layer.
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, vocab_size=VOCAB, max_position_embeddings=256)
# 30 % of 512 channels leaves 358 or so: not a multiple of 64 or 128, so group sizes force rounding.
# Half of the 4 KV groups go: 4 query heads divide the hidden size, as LlamaConfig requires (30 % of
# the KV groups per layer would leave 6 heads, which only load_pruned can load; tested below).
FAST = {"steps": 3, "batch_size": 4, "init_batches": 2, "seq_len": None, "sparsity": 0.3, "attn_sparsity": 0.5}


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + word-level tokenizer (oneshot needs a name_or_path)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY))
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib() -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (16, 32), generator=g)  # 4 search batches of 4; GPTQ sees all 16
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _recipe(name: str, **overrides) -> str:
    """A shipped recipe as YAML text, with the pruning modifier's search shrunk for the test."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"].update(FAST | overrides)
    return yaml.safe_dump(recipe, sort_keys=False)


def _oneshot(tiny_dir, calib, recipe, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    oneshot(model=model, processor=PreTrainedTokenizerFast.from_pretrained(tiny_dir), dataset=calib, recipe=recipe,
            num_calibration_samples=len(calib), max_seq_length=32, shuffle_calibration_samples=False, **kwargs)
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
def test_recipe_prunes_quantizes_saves_and_reloads(tiny_dir, calib, tmp_path, recipe, overrides, group_size):
    model = _oneshot(tiny_dir, calib, _recipe(recipe, **overrides))
    widths = _widths(model)
    assert all(o < 8 * 32 for o, _ in widths) or all(d < 512 for _, d in widths)  # something was removed
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
    report = json.loads((out / plugin.REPORT_FILE).read_text())
    assert report["group_sizes"] == ([group_size] if group_size else [])
    assert report["kept_per_layer"] == [{"q_heads": o // 32, "kv_heads": o // 64, "mlp": d} for o, d in widths]

    reloaded = load_pruned(out)
    assert _widths(reloaded) == widths
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    uniform = not yaml.safe_load(_recipe(recipe, **overrides))["pruning_stage"]["pruning_modifiers"][
        "PolicyGradientPruningModifier"]["global_budget"]
    if uniform:  # one width in every layer: stock from_pretrained reads the standard config fields
        assert len(set(widths)) == 1 and TINY["hidden_size"] % (widths[0][0] // 32) == 0
        assert saved["intermediate_size"] == widths[0][1] and saved["num_attention_heads"] * 32 == widths[0][0]
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert _widths(stock) == widths
        with torch.no_grad():
            torch.testing.assert_close(stock(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    else:
        assert len(set(widths)) > 1  # the global budget gave per-layer widths; load_pruned read them


def test_model_offloaded_before_oneshot_and_head_count_llama_rejects(tiny_dir, calib, tmp_path):
    """Torch-Pruning assigns new Parameters, which compressed-tensors' offload cache accepts.

    3 of 4 KV groups leave 6 query heads, which LlamaConfig refuses with hidden size 128: the saved
    config keeps the original width fields and load_pruned builds the layers from pruned_layers.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    set_onload_device(model, "cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj._parameters, OffloadCache)
    oneshot(model=model, processor=PreTrainedTokenizerFast.from_pretrained(tiny_dir), dataset=calib,
            recipe=_recipe("pg_prune_fp8_dynamic.yaml", attn_sparsity=0.3), num_calibration_samples=len(calib),
            max_seq_length=32, shuffle_calibration_samples=False)
    widths = _widths(model)
    assert widths == [(6 * 32, widths[0][1])] * 2 and widths[0][1] < 512
    with torch.no_grad():
        expected = model(PROBE).logits
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_attention_heads"] == 8 and [w["num_attention_heads"] for w in saved["pruned_layers"]] == [6, 6]
    reloaded = load_pruned(tmp_path / "out")
    assert _widths(reloaded) == widths
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, expected, rtol=1e-4, atol=1e-4)


def test_resume_reuses_a_finished_search(tiny_dir, calib, tmp_path):
    state = tmp_path / "search.pt"
    first = _oneshot(tiny_dir, calib, _recipe("pg_prune.yaml", checkpoint_path=str(state)))
    assert state.is_file()
    again = _oneshot(tiny_dir, calib, _recipe("pg_prune.yaml", checkpoint_path=str(state)))
    assert _widths(again) == _widths(first)
    with pytest.raises(ResumeError, match="another model, calibration set or configuration"):
        _oneshot(tiny_dir, calib, _recipe("pg_prune.yaml", checkpoint_path=str(state), sparsity=0.5))


# ---------------------------------------------------------------------------------------- bad input

def test_registered_by_importing_the_package():
    assert ModifierFactory._registered_registry["PolicyGradientPruningModifier"] is PolicyGradientPruningModifier
    assert pg_pruning_plugin.integrations.llmcompressor is plugin


def test_misspelled_field_names_the_field():
    text = _recipe("pg_prune.yaml").replace("sparsity: 0.3", "sparsty: 0.3")
    with pytest.raises(ValidationError, match=r"sparsty\s+Extra inputs are not permitted"):
        Recipe.create_instance(text)
    with pytest.raises(ValidationError, match="init="):
        PolicyGradientPruningModifier(init="wanda")
    with pytest.raises(ValidationError, match="sparsity"):
        PolicyGradientPruningModifier(sparsity=1.2)


def test_quantization_before_pruning_is_refused(tiny_dir, calib):
    recipe = yaml.safe_load(_recipe("pg_prune_gptq_w4a16.yaml"))
    recipe = {"quant_stage": recipe["quant_stage"], "pruning_stage": recipe["pruning_stage"]}
    with pytest.raises(RecipeOrderError, match="Move PolicyGradientPruningModifier first"):
        _oneshot(tiny_dir, calib, yaml.safe_dump(recipe, sort_keys=False))


def test_cli_refuses_a_recipe_without_modifiers(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"  # llmcompressor parses this layout to zero modifiers, silently
    flat.write_text("PolicyGradientPruningModifier:\n  sparsity: 0.3\n")
    assert main(["recipe", str(flat), "--output", str(tmp_path / "out")]) == 2
    assert "defines no modifier" in capsys.readouterr().err and not (tmp_path / "out").exists()


class _SearchStarted(AssertionError):
    pass


def _no_search(*args, **kwargs):
    raise _SearchStarted("the search started")


def test_impossible_group_size_fails_before_the_search(tiny_dir, calib, monkeypatch):
    monkeypatch.setattr(plugin, "PolicyGradientSearch", _no_search)
    recipe = _recipe("pg_prune_gptq_w4a16_g64.yaml").replace("group_size: 64", "group_size: 96")
    with pytest.raises(ValueError, match="group size 96.*hidden size 128"):
        _oneshot(tiny_dir, calib, recipe)
    with pytest.raises(ValueError, match="multiples of 1024.*only 512 channels"):
        _oneshot(tiny_dir, calib, _recipe("pg_prune_gptq_w4a16.yaml", round_to=1024))
    with pytest.raises(_SearchStarted):  # the sentinel works: a valid recipe reaches the search
        _oneshot(tiny_dir, calib, _recipe("pg_prune_gptq_w4a16_g64.yaml"))


def test_no_calibration_data(tiny_dir, monkeypatch):
    monkeypatch.setattr(plugin, "PolicyGradientSearch", _no_search)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="needs calibration data.*dataset="):
        oneshot(model=model, recipe=_recipe("pg_prune.yaml"))


def test_unsupported_architecture_fails_first(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=VOCAB))
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
    batches = plugin.search_batches(loader, batch_size=2, seq_len=2)
    # rows: [5 6] [7 8] (tail 9 dropped), [1 2] (tail 3 dropped), [4 5] [6 7] -> 5 blocks, 2 full batches
    assert [b["input_ids"].tolist() for b in batches] == [[[5, 6], [7, 8]], [[1, 2], [4, 5]]]
    whole = plugin.search_batches(loader, batch_size=3)
    assert whole[0]["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0], [4, 5, 6, 7, 0]]
    assert whole[0]["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="no sequence"):
        plugin.search_batches([{"input_ids": torch.tensor([[1]])}], batch_size=1)


# ------------------------------------------------------------------------------------- command line

def test_cli_runs_a_recipe_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(1)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (4000,), generator=g)))
    out = tmp_path / "pruned"
    args = ["recipe", str(RECIPES / "pg_prune_fp8_dynamic.yaml"), "--model", str(tiny_dir), "--text", str(text),
            "--output", str(out), "--num-samples", "16", "--seq-len", "32"]
    overrides = [x for k, v in FAST.items() if k != "seq_len" for x in ("--set", f"{k}={v}")]
    assert main(args + overrides) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] < 512 and saved["quantization_config"]["format"] == "float-quantized"
    assert (out / "tokenizer.json").is_file() and (out / "recipe.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert SearchSpace.from_model(model).layers[0].intermediate_size == saved["intermediate_size"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")) == []  # no temp dir left

    assert main(args) == 2  # existing output without --overwrite: refused before any work
    assert main(args[:-6] + ["--output", str(tiny_dir / "sub")]) == 2  # never inside the model directory
    assert not (tiny_dir / "sub").exists()
    assert main(args + ["--set", "sparsty=0.3", "--overwrite"]) == 2  # unknown field: refused before loading
