"""`pg-prune eval` on a pruned checkpoint and `pg-prune build-tasks`."""

import json

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


def test_build_tasks_writes_the_local_tasks(tmp_path, capsys):
    assert main(["build-tasks", "--tasks", "arc_easy", "--out", str(tmp_path / "tasks")]) == 0
    assert "arc_easy_local" in capsys.readouterr().out
    assert (tmp_path / "tasks" / "tasks" / "arc_easy_local.yaml").is_file()
