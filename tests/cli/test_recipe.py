"""`pg-prune recipe`: an llmcompressor recipe file run with ``oneshot``; recipes and budgets checked
before anything loads."""

import json

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from pg_pruning_plugin import SearchSpace
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.cli.recipe import recipe_text
from tests.helpers import FAST_RECIPE, QUANT_TINY, QUANT_VOCAB, RECIPES, save_tiny, word_tokenizer

# the search shrunk for the test, as --set overrides: the per-unit recipes', and pg_prune.yaml's (allocation)
FAST = {k: v for k, v in FAST_RECIPE["authors"].items() if k != "seq_len"}
FAST_ALLOCATION = {k: v for k, v in FAST_RECIPE["allocation"].items() if k != "seq_len"}


def test_cli_refuses_a_recipe_without_modifiers(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"  # llmcompressor parses this layout to zero modifiers, silently
    flat.write_text("PolicyGradientPruningModifier:\n  sparsity: 0.3\n")
    assert main(["recipe", str(flat), "--output", str(tmp_path / "out")]) == 2
    assert "defines no modifier" in capsys.readouterr().err and not (tmp_path / "out").exists()

def test_cli_runs_a_recipe_file(llmc_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(1)
    text = tmp_path / "llmc_calib.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, QUANT_VOCAB - 3, (4000,), generator=g)))
    out = tmp_path / "pruned"
    args = ["recipe", str(RECIPES / "pg_prune_fp8_dynamic.yaml"), "--model", str(llmc_dir), "--text", str(text),
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
    assert main(args[:-6] + ["--output", str(llmc_dir / "sub")]) == 2  # never inside the model directory
    assert not (llmc_dir / "sub").exists()
    assert main(args + ["--set", "sparsty=0.3", "--overwrite"]) == 2  # unknown field: refused before loading

def test_cli_set_accepts_block_and_cost_fields(tmp_path):
    text, prunes = recipe_text(RECIPES / "pg_prune_depth.yaml", [
        "granularity=depth", "cost=custom", "custom_costs={attn: 2, mlp: 0.5}", "cost_seq_len=512", "sparsity=0.4"])
    fields = yaml.safe_load(text)["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]
    assert prunes and fields["granularity"] == "depth" and fields["custom_costs"] == {"attn": 2, "mlp": 0.5}
    assert fields["cost"] == "custom" and fields["cost_seq_len"] == 512
    text, _ = recipe_text(RECIPES / "pg_prune.yaml", ["cost=none", "granularity=width"])
    assert yaml.safe_load(text)["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]["cost"] is None
    text, _ = recipe_text(RECIPES / "pg_prune.yaml", ["refit=none", "loop_refit=None"])  # the option named none
    fields = yaml.safe_load(text)["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]
    assert fields["refit"] == "none" and fields["loop_refit"] == "none"
    with pytest.raises(ValidationError, match="positive cost"):
        recipe_text(RECIPES / "pg_prune_depth.yaml", ["cost=custom", "custom_costs={attn: 0, mlp: 1}"])
    with pytest.raises(ValidationError, match="granularity='deep'"):
        recipe_text(RECIPES / "pg_prune_depth.yaml", ["granularity=deep"])

def test_cli_refuses_an_unreachable_budget_before_loading(llmc_dir, tmp_path, capsys, monkeypatch):
    import pg_pruning_plugin.cli.recipe as cli_recipe

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer (and model) should not be loaded")

    monkeypatch.setattr(cli_recipe, "load_tokenizer", no_tokenizer)
    out = tmp_path / "out"
    code = main(["recipe", str(RECIPES / "pg_prune_depth.yaml"), "--model", str(llmc_dir), "--output", str(out),
                 "--set", "granularity=depth", "--set", "sparsity=0.9"])
    assert code == 2 and not out.exists()
    assert "reachable: sparsity in (0, 0.8333]" in capsys.readouterr().err


def test_cli_computes_in_float32_on_the_cpu_whatever_the_checkpoint(tmp_path, monkeypatch):
    """A bfloat16 checkpoint (as the embedded model's cache is) is pruned in float32 on the CPU, as pg-prune
    prune does; stock oneshot would use the checkpoint's bfloat16 (--precision auto)."""
    monkeypatch.setenv("PG_PRUNING_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "bf16"
    save_tiny(model_dir, word_tokenizer(QUANT_VOCAB), **QUANT_TINY).to(torch.bfloat16).save_pretrained(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % (QUANT_VOCAB - 3)}" for i in range(4000)))
    args = ["recipe", str(RECIPES / "pg_prune.yaml"), "--model", str(model_dir), "--text", str(text),
            "--output", str(tmp_path / "out"), "--num-samples", "16", "--seq-len", "32"]
    assert main(args + [x for k, v in FAST_ALLOCATION.items() for x in ("--set", f"{k}={v}")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_cli_refuses_a_missing_text_file_before_loading(llmc_dir, tmp_path, capsys, monkeypatch):
    import pg_pruning_plugin.cli.recipe as cli_recipe

    monkeypatch.setattr(cli_recipe, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the text check"))
    assert main(["recipe", str(RECIPES / "pg_prune.yaml"), "--model", str(llmc_dir), "--text",
                 str(tmp_path / "missing.txt"), "--output", str(tmp_path / "out")]) == 2
    assert "missing.txt' is neither a built-in source" in capsys.readouterr().err
