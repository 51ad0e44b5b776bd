"""`pg-prune eval` on a pruned checkpoint (each result printed once, float32 on the CPU, no tokenizer warning)
and `pg-prune build-tasks`."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from pg_pruning_plugin import SearchSpace, prune_model, save_pruned
from pg_pruning_plugin.cli import main
from tests.helpers import random_masks, tiny_model


def test_eval_reads_a_pruned_checkpoint(tok, tmp_path, capsys):
    model = tiny_model(vocab_size=len(tok))
    prune_model(model, random_masks(SearchSpace.from_model(model)))
    save_pruned(model, tmp_path / "pruned", tok)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "pruned"), "--max-windows", "2", "--json", str(out)]) == 0
    assert "PPL" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["perplexity"][0]["n_windows"] == 2 and result["perplexity"][0]["seq_len"] == 128


def test_eval_prints_each_result_once_and_quietly(tok, tmp_path):
    model = tiny_model(vocab_size=len(tok)).to(torch.bfloat16)
    prune_model(model, random_masks(SearchSpace.from_model(model)))
    save_pruned(model, tmp_path / "pruned", tok)
    pg_prune = Path(sys.executable).parent / "pg-prune"
    proc = subprocess.run([str(pg_prune), "eval", str(tmp_path / "pruned"), "--max-windows", "2", "--json",
                           str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout + proc.stderr
    assert printed.count("PPL") == 1, printed
    assert "clean_up_tokenization_spaces" not in printed and "No accelerator available" not in printed


def test_embedded_tokenizer_decodes_without_warnings(tok, caplog):
    with caplog.at_level("WARNING"):
        tok.decode([1, 2, 3, 400])
    assert tok.clean_up_tokenization_spaces is False
    assert "clean_up_tokenization_spaces" not in caplog.text


def test_build_tasks_writes_the_local_tasks(tmp_path, capsys):
    assert main(["build-tasks", "--tasks", "arc_easy", "--out", str(tmp_path / "tasks")]) == 0
    assert "arc_easy_local" in capsys.readouterr().out
    assert (tmp_path / "tasks" / "tasks" / "arc_easy_local.yaml").is_file()
