"""`pg-prune prune` refuses bad input with a one-line error before loading anything."""

import pytest

from pg_pruning_plugin.cli import main


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
