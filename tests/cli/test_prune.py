"""`pg-prune prune`: bad input is refused with a one-line error before loading anything; a tiny run
with blocks and a parameter target writes the report and a loadable model."""

import json

import pytest
import torch

from pg_pruning_plugin import load_pruned
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.core.architectures import count_parameters
from pg_pruning_plugin.reporting import REPORT_FILE
from tests.helpers import save_tiny


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.2"], "must be in (0, 1)"),
    (["--mlp-sparsity", "0"], "must be in (0, 1)"),
    (["--samples", "1"], "samples_per_step"),
    (["--init", "magnitude", "--round-to", "0"], "round_to"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--text", "notes.txt"], "no held-out split"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert main(["prune", "--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["prune", "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_output_inside_the_input_model_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert main(["prune", "--model", str(model_dir), "--output", str(model_dir / "pruned"), "--overwrite"]) == 2
    assert "inside the input model directory" in capsys.readouterr().err


def test_unsupported_architecture_is_refused_before_weights_load(tmp_path, capsys):
    from transformers import GPT2Config

    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(model_dir)  # config only: no weights to load
    assert main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "llama" in err


def test_resume_without_state_and_stale_state_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--output", str(out), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "out.search-state.pt").write_bytes(b"x")
    assert main(["prune", "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--granularity", "depth", "--uniform"], "one global budget"),
    (["--cost", "params", "--attn-sparsity", "0.2"], "one ratio"),
])
def test_bad_budget_options_are_refused(argv, message, tmp_path, capsys):
    assert main(["prune", "--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_prune_with_blocks_and_a_parameter_target(tok, tmp_path, capsys):
    """Tiny model, real tokenizer and text: --granularity width+depth --keep-params, report and reload."""
    model_dir = tmp_path / "tiny"
    total = count_parameters(save_tiny(model_dir, tok, num_hidden_layers=4))
    keep = total - 60_000  # about half of the 155,648 prunable parameters
    argv = ["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--granularity", "width+depth",
            "--keep-params", str(keep), "--steps", "3", "--batch-size", "2", "--init-batches", "1",
            "--eval-windows", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "requested" in printed and "removed parameters by unit kind" in printed
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["params_after"] <= keep
    assert report["requested"]["keep_params"] == keep and report["run"]["model"] == str(model_dir)
    budget = report["accounting"]["prunable_params"]
    assert budget["kept"] <= budget["requested"] and budget["requested"] == pytest.approx(budget["dense"] - 60_000)
    reloaded = load_pruned(tmp_path / "out")
    assert count_parameters(reloaded) == report["params_after"]
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.randint(0, len(tok), (1, 8))).logits).all()
    assert main([*argv, "--keep-params", "10", "--overwrite"]) == 2  # the last --keep-params wins
    assert "never pruned" in capsys.readouterr().err
