"""`pg-prune compare`: every method × refit at one parameter budget, rows to a JSON file with resume,
zero-shot for the selected rows only."""

from __future__ import annotations

import json
import math

import pytest

from pg_pruning_plugin.cli import main
from pg_pruning_plugin.cli.compare import search_config, search_configs, steps_of, zero_shot_summary, zero_shot_targets
from pg_pruning_plugin.evaluation import zero_shot as zero_shot_module
from pg_pruning_plugin.refit import REFIT_METHODS
from pg_pruning_plugin.scoring.baselines import PARAM_MATCHED
from pg_pruning_plugin.search.config import SearchConfig
from tests.helpers import save_tiny

# 4 layers of 2 KV groups (10,240 parameters each) and 96 channels (192 each): 155,648 prunable parameters
PRUNABLE, PER_CHANNEL = 4 * (2 * 10_240 + 96 * 192), 192


def _fake_zero_shot(calls: list):
    def zero_shot(net, tokenizer, tasks, limit, batch_size, offline):
        calls.append(sum(p.numel() for p in net.parameters()))
        return {"tasks": {t: {"acc": 0.5, "acc_stderr": 0.03, "n": limit} for t in tasks}, "mean_acc": 0.5,
                "limit": limit, "offline": offline}
    return zero_shot


def test_compare_command_end_to_end(tok, tmp_path, capsys, monkeypatch):
    """Every parameter-matched baseline and the search × every refit: rows exist, are finite and remove the
    requested fraction; zero-shot for dense, the best baseline and the search; resume; bad settings."""
    calls: list = []
    monkeypatch.setattr(zero_shot_module, "zero_shot", _fake_zero_shot(calls))
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, max_position_embeddings=2048, num_hidden_layers=4)
    out = tmp_path / "q"
    # 40 blocks: the default search configuration holds 32 of them out of its steps for its incumbent check
    argv = ["compare", "--model", str(model_dir), "--ratios", "0.5", "--calib-blocks", "40", "--calib-seq-len", "32",
            "--batch-size", "4", "--steps", "3", "--ppl128-windows", "2", "--ppl2048-windows", "0", "--limit", "2",
            "--tasks", "arc_easy", "boolq", "--offline", "no", "--results", str(out / "q.json")]
    assert main(argv) == 0
    state = json.loads((out / "q.json").read_text())
    rows = state["rows"]
    searches = [f"pg-{name}" for name in search_configs()]  # the default configuration first, then the authors'
    methods = [*PARAM_MATCHED, *searches]
    assert [(r["method"], r["refit"]) for r in rows] == [("dense", "none")] + [
        (m, o) for m in methods for o in REFIT_METHODS]
    for r in rows:
        assert math.isfinite(r["ppl128"]) and "ppl2048" not in r, (r["method"], r["refit"])  # PPL@2048: tests/bench
    for r in rows[1:]:
        assert r["refit_seconds"] >= 0 and r["selection_seconds"] >= 0
        assert r["refit_tokens"] == (0 if r["refit"] == "none" else 40 * 32)  # "none" needs no calibration pass
        assert abs(r["prunable_removed"] - 0.5) * PRUNABLE <= PER_CHANNEL, r["method"]  # every method, the search too
    by = {(r["method"], r["refit"]): r for r in rows}
    assert by[("shortgpt", "none")]["layers"] == 2 and by[("flap", "none")]["kv_groups"] == 4
    assert set(by[("flap", "lstsq")]["refit_errors"]) == {"o_proj", "down_proj"}
    assert [by[(m, "none")]["search_config"]["preset"] for m in searches] == list(search_configs())
    assert {by[(m, "bias")]["search_config"]["steps"] for m in searches} == {3}
    assert state["eval"] == {"ppl128_windows": 2, "ppl2048_windows": 0, "calib_tokens": 40 * 32}
    assert state["machine"]["versions"]["torch"] and state["commands"][0].startswith("pg-prune")
    # zero-shot: dense, the best baseline (lowest PPL@128 over methods and refits), the search's best refit
    measured = [r for r in rows if "zero_shot" in r]
    best = min((r for r in rows[1:] if not r["method"].startswith("pg-")), key=lambda r: r["ppl128"])
    assert measured[0]["method"] == "dense" and best in measured and len(measured) == 2 + len(searches) == len(calls)
    assert measured[0]["zero_shot"]["mean_stderr"] == pytest.approx(math.sqrt(2 * 0.03**2) / 2)
    assert (out / "q.masks.pt").is_file()
    # resume adds only the missing rows; the saved masks and zero-shot results are reused
    assert main([*argv, "--methods", "wanda-sp-units", "random", "--refit", "none", "--resume"]) == 0
    rows = json.loads((out / "q.json").read_text())["rows"]
    assert (rows[-1]["method"], rows[-1]["refit"]) == ("wanda-sp-units", "none") and len(rows) == 2 + 3 * len(methods)
    # another zero-shot limit on resume: the same rows, their zero-shot re-measured at the new limit
    before, relimit = len(calls), [*argv]
    relimit[relimit.index("--limit") + 1] = "3"
    assert main([*relimit, "--refit", "none", "--resume"]) == 0
    state = json.loads((out / "q.json").read_text())
    assert len(state["rows"]) == len(rows) and len(calls) == before + 2 + len(searches)
    assert state["settings"]["limit"] == 3
    assert {r["zero_shot"]["limit"] for r in state["rows"] if "zero_shot" in r} == {3}
    assert main([*argv, "--resume", "--damping", "0.1"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_zero_shot_targets_pick_the_best_rows():
    rows = [{"method": "dense", "ratio": 0.0, "refit": "none", "ppl128": 10.0}]
    for ratio, values in ((0.3, {"flap": (50, 20, 30), "random": (900, 800, 700), "pg-default": (60, 40, 25)}),
                          (0.5, {"flap": (500, 200, 300), "random": (90, 95, 99), "pg-default": (600, 400, 250)})):
        for method, ppls in values.items():
            rows += [{"method": method, "ratio": ratio, "refit": o, "ppl128": p} for o, p in zip(REFIT_METHODS, ppls)]
    picked = [(role, r["method"], r["ratio"], r["refit"]) for role, r in zero_shot_targets(rows, ["dense", "search",
                                                                                                 "best-baseline"])]
    assert picked == [("dense", "dense", 0.0, "none"), ("best-baseline", "flap", 0.3, "bias"),
                      ("search", "pg-default", 0.3, "lstsq"), ("best-baseline", "random", 0.5, "none"),
                      ("search", "pg-default", 0.5, "lstsq")]
    only = [(role, r["ratio"]) for role, r in zero_shot_targets(rows, ["dense", "best-baseline"], ratios=[0.5])]
    assert only == [("dense", 0.0), ("best-baseline", 0.5)]  # a run of some ratios measures only those
    assert [role for role, _ in zero_shot_targets(rows, ["search"])] == ["search", "search"]
    tasks = {"a": {"acc": 0.6, "acc_stderr": 0.03}, "b": {"acc": 0.4, "acc_stderr": 0.04}}
    summary = zero_shot_summary({"tasks": tasks, "mean_acc": 0.5}, 200)
    assert summary["mean_stderr"] == pytest.approx(0.025) and summary["limit"] == 200


def test_search_config_is_the_preset_with_the_shared_settings():
    config = search_config("authors", 0.3, num_batches=16, batch_size=8, seed=7, steps=100)
    assert (config.preset, config.sparsity, config.steps, config.batch_size, config.seed) == ("authors", 0.3, 100, 8, 7)
    assert config.init_batches == 16 and config.max_epochs == 7  # the steps cycle over the 16 batches
    assert search_configs()[0] == SearchConfig().preset and "authors" in search_configs()
    for name in search_configs():  # otherwise the preset's own settings, its step count included
        preset = SearchConfig(preset=name)
        epochs = preset.max_epochs and max(preset.max_epochs, math.ceil(preset.steps / 16))
        assert search_config(name, 0.3, 16, 8, 7) == SearchConfig(preset=name, sparsity=0.3, seed=7, init_batches=16,
                                                                  max_epochs=epochs)
    assert steps_of([("*", 50), ("authors", 500)], "authors") == 500 and steps_of([("*", 50)], "x") == 50


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "mmlu_pro_xx"], "unknown zero-shot task"),
    (["--ratios", "0", "0.5"], "each must be in"),
    (["--calib-blocks", "4"], "fewer than one batch"),
    (["--damping", "0"], "--damping 0.0"),
    (["--steps", "nobody=5"], "unknown search configuration"),
])
def test_compare_bad_input_before_loading(extra, message, tmp_path, capsys):
    assert main(["compare", "--model", "/nonexistent/model", "--results", str(tmp_path / "q.json"), *extra]) == 2
    assert message in capsys.readouterr().err
