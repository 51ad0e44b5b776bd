"""What a user of stock llmcompressor and transformers sees: the modifier's summary in llmcompressor's (loguru)
log from a plain ``oneshot()``, an ``output_dir`` on the input model refused before anything is written, what
stock ``from_pretrained`` does with a per-layer-width compressed-tensors output, and which saved
``recipe.yaml`` files llmcompressor 0.14 can read back."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from loguru import logger
from transformers import PreTrainedTokenizerFast

from pg_pruning_plugin import load_pruned
from tests.helpers import QUANT_TINY, QUANT_VOCAB, fast_recipe, save_tiny, word_tokenizer

PROBE = torch.arange(3, 3 + 24).view(2, 12)



def _oneshot(model_dir, calib, recipe: str, output_dir) -> None:
    """``oneshot`` as the docs' Python example calls it: a model directory and an output directory."""
    oneshot(model=str(model_dir), processor=PreTrainedTokenizerFast.from_pretrained(model_dir), dataset=calib,
            recipe=recipe, num_calibration_samples=len(calib), max_seq_length=32, shuffle_calibration_samples=False,
            output_dir=str(output_dir))


def test_plain_oneshot_shows_the_summary_in_llmcompressors_log(llmc_dir, llmc_calib, tmp_path):
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    try:
        _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune.yaml"), tmp_path / "out")
    finally:
        logger.remove(sink)
    summary = [m for m in messages if m.startswith("PolicyGradientPruningModifier: cost budget (params")]
    assert summary and "of the prunable parameters (requested 30.0%)" in summary[0]
    assert any("kept per layer" in m or "layer  attn block" in m for m in messages)


def test_oneshot_into_the_models_own_directory_is_refused_before_writing(llmc_calib, tmp_path):
    model_dir = tmp_path / "model"
    save_tiny(model_dir, word_tokenizer(QUANT_VOCAB), **QUANT_TINY)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    try:
        _oneshot(model_dir, llmc_calib, fast_recipe("pg_prune.yaml"), model_dir)
    except ValueError as exc:
        assert "input model" in str(exc)
    else:
        raise AssertionError("oneshot wrote the pruned model over its input")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_stock_from_pretrained_on_a_per_layer_compressed_output(llmc_dir, llmc_calib, tmp_path):
    """Stock transformers loads a compressed-tensors checkpoint with per-layer widths and computes the pruned
    model's logits (the quantizer takes each weight as stored), but the Linear attributes come from the
    config's single widths (the widest layer's), not from the weights: load_pruned gives the true ones."""
    out = tmp_path / "out"
    _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_fp8_dynamic.yaml", global_budget=True), out)
    saved = json.loads((out / "config.json").read_text())
    widths = [w["intermediate_size"] for w in saved["pruned_layers"]]
    assert len(set(widths)) > 1 and saved["intermediate_size"] == max(widths)
    pruned = load_pruned(out)
    with torch.no_grad():
        torch.save(pruned(PROBE).logits, tmp_path / "expected.pt")
    code = (  # a fresh process that never imports the plugin
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(torch.arange(3, 27).view(2, 12)).logits\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "downs = [layer.mlp.down_proj for layer in model.model.layers]\n"
        "print(json.dumps({'diff': float((logits - expected).abs().max()), 'dtype': str(model.dtype),\n"
        "                  'in_features': [d.in_features for d in downs],\n"
        "                  'weight_columns': [d.weight.shape[1] for d in downs]}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stock["diff"] < 1e-5 and stock["dtype"] == "torch.float32"  # the checkpoint's dtype
    assert stock["weight_columns"] == widths and stock["in_features"] == [max(widths)] * len(widths)
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == widths


def test_which_saved_recipes_llmcompressor_reads_back(llmc_dir, llmc_calib, tmp_path):
    """llmcompressor 0.14 writes GPTQ's activation ordering (and SmoothQuant's mappings) with Python YAML tags
    that its own safe loader refuses; FP8_DYNAMIC and pruning-only recipes read back."""
    _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_fp8_dynamic.yaml"), tmp_path / "fp8")
    _oneshot(llmc_dir, llmc_calib, fast_recipe("pg_prune_gptq_w4a16_g64.yaml"), tmp_path / "gptq")
    fp8 = Recipe.create_instance((tmp_path / "fp8" / "recipe.yaml").read_text())
    assert [type(m).__name__ for m in fp8.modifiers] == ["PolicyGradientPruningModifier", "QuantizationModifier"]
    saved = (tmp_path / "gptq" / "recipe.yaml").read_text()
    assert "!!python/object/apply:compressed_tensors.quantization.quant_args.ActivationOrdering" in saved
    try:
        Recipe.create_instance(saved)
    except ValueError as exc:
        assert "could not determine a constructor" in str(exc.__cause__ or exc.__context__)
    else:
        raise AssertionError("llmcompressor now reads its saved GPTQ recipe: update docs/llmcompressor.md")
