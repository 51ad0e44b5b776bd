"""`pg-prune prune`: bad input is refused with a one-line error before loading anything (the output never
on the input model or the caches, the text file and the resume state checked first); a tiny run with blocks
and a parameter target writes the report and a loadable model; Ctrl-C names the saved step and the command
that resumes it; the help is instant and shows the defaults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pg_pruning_plugin import SearchSpace, load_pruned
from pg_pruning_plugin.cli import build_parser, main
from pg_pruning_plugin.cli.prune import _config
from pg_pruning_plugin.core.architectures import count_parameters
from pg_pruning_plugin.reporting import REPORT_FILE
from pg_pruning_plugin.resources.assets import smollm2_gguf
from pg_pruning_plugin.resources.models import gguf_cache_path, weightless_model
from pg_pruning_plugin.search.state_file import signature, write_state
from tests.helpers import TINY, save_tiny

PG_PRUNE = str(Path(sys.executable).parent / "pg-prune")


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.2"], "must be in (0, 1)"),
    (["--preset", "authors", "--mlp-sparsity", "0"], "must be in (0, 1)"),
    (["--mlp-sparsity", "0.3"], "use preset='authors'"),  # the allocation preset has one budget
    (["--samples", "1"], "samples_per_step"),
    (["--preset", "authors", "--init", "magnitude", "--round-to", "0"], "round_to"),
    (["--baseline", "flap", "--preset", "authors"], "prunable-parameter budget"),  # a baseline needs a parameter budget
    (["--model", "/no/such/model"], "does not exist"),
    (["--text", "notes.txt"], "neither a built-in source"),
    (["--text", "{tmp}/notes.txt"], "no held-out split"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("some text")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["prune", "--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["prune", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err


def test_output_on_or_around_the_input_model_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for output in (model_dir / "pruned", model_dir, tmp_path):
        assert main(["prune", "--model", str(model_dir), "--output", str(output), "--overwrite"]) == 2
        assert "the input model" in capsys.readouterr().err


def test_the_embedded_model_and_the_cache_are_never_the_output(capsys):
    for output in (gguf_cache_path(smollm2_gguf()), smollm2_gguf().parent):  # default --model: its cache, its wheel
        assert main(["prune", "--output", str(output), "--overwrite"]) == 2
        assert "the input model" in capsys.readouterr().err


def test_an_output_beside_a_gguf_input_is_fine(tmp_path, capsys):
    gguf = tmp_path / "models" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert main(["prune", "--model", str(gguf), "--output", str(tmp_path / "models" / "x-pruned"), "--resume"]) == 2
    assert "--resume given but" in capsys.readouterr().err  # past the output check
    assert main(["prune", "--model", str(gguf), "--output", str(gguf), "--overwrite"]) == 2
    assert "the input model" in capsys.readouterr().err


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


def _config_only(path: Path) -> Path:
    """A Llama directory with a config and no weights or tokenizer: loading it would fail, so an error about
    anything else was raised before the model loaded."""
    AutoConfig.for_model("llama", **TINY).save_pretrained(path)
    return path


def test_resume_state_is_checked_before_the_model_loads(tmp_path, capsys):
    model_dir, out = _config_only(tmp_path / "model"), tmp_path / "out"
    state = tmp_path / "out.search-state.pt"
    argv = ["prune", "--model", str(model_dir), "--output", str(out), "--steps", "3", "--resume"]
    state.write_bytes(b"not a search state")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot read search state {state}" in err and ".." not in err
    space = SearchSpace.from_model(weightless_model(model_dir))
    earlier = _config(build_parser(["prune"]).parse_args(["prune", "--steps", "5"]))  # the same run with 5 steps
    write_state(state, signature(earlier, space, 5), {"step": 2}, seconds=1.0)
    assert main(argv) == 2
    assert "steps was 5, this run has 3" in capsys.readouterr().err


def test_missing_text_file_is_refused_before_the_model_loads(tmp_path, capsys):
    model_dir = _config_only(tmp_path / "model")
    argv = ["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--text", str(tmp_path / "a.txt"),
            "--eval-text", str(tmp_path / "b.txt")]
    assert main(argv) == 2
    assert "a.txt' is neither a built-in source" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--preset", "authors", "--granularity", "depth", "--uniform"], "one global budget"),
    (["--preset", "authors", "--cost", "params", "--attn-sparsity", "0.2"], "one ratio"),
    (["--granularity", "depth"], "the allocation policy searches widths"),
])
def test_bad_budget_options_are_refused(argv, message, tmp_path, capsys):
    assert main(["prune", "--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_prune_with_blocks_and_a_parameter_target(tok, tmp_path, capsys):
    """Tiny model, real tokenizer and text: --granularity width+depth --keep-params, report and reload."""
    model_dir = tmp_path / "tiny"
    total = count_parameters(save_tiny(model_dir, tok, num_hidden_layers=4))
    keep = total - 60_000  # about half of the 155,648 prunable parameters
    argv = ["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--preset", "authors",
            "--granularity", "width+depth",
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


def test_ctrl_c_names_the_saved_step_and_the_resume_command(tok, tmp_path):
    """The real command, interrupted with SIGINT once a state is saved, then resumed with the printed command."""
    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    save_tiny(model_dir, tok)
    argv = [PG_PRUNE, "prune", "--model", str(model_dir), "--output", str(out), "--steps", "400", "--batch-size", "1",
            "--seq-len", "16", "--init-batches", "1", "--checkpoint-every", "2", "--eval-windows", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PATH": f"{Path(PG_PRUNE).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = Path(f"{out}.search-state.pt")
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pg-prune prune: interrupted; the search state after step ")
    assert f"of 400 is in {state}" in line
    command = line.split("Resume with: ")[1]
    assert command.endswith(" --resume") and str(out) in command
    done = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(resumed at step" in done.stdout and (out / REPORT_FILE).is_file() and not state.exists()


def test_help_is_instant_quiet_and_shows_the_defaults():
    code = ("import sys, time; start = time.perf_counter(); from pg_pruning_plugin.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.perf_counter() - start, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds, imported = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert imported == "[]" and proc.stderr == "" and float(seconds) < 1.0
    helped = subprocess.run([PG_PRUNE, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stderr == "" and "export-gguf" in helped.stdout
    prune_help = " ".join(subprocess.run([PG_PRUNE, "prune", "--help"], capture_output=True, text=True,
                                         timeout=300).stdout.split())
    assert "(default: allocation)" in prune_help and "(default: smollm2-135m)" in prune_help
    assert "(default: lstsq)" in prune_help and "allocation: 100" in prune_help
