"""`pg-prune compare`: baselines and the search side by side, rows to a JSON file with resume."""

from __future__ import annotations

import json
import math

import pytest

from pg_pruning_plugin.cli import main
from tests.helpers import save_tiny


def test_compare_command_end_to_end(tok, tmp_path, capsys):
    """`pg-prune compare` on a tiny model with the real tokenizer: rows, resume, bad input."""
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, max_position_embeddings=2048)
    out = tmp_path / "q"
    argv = ["compare", "--model", str(model_dir), "--ratios", "0.5", "--methods", "random", "flap",
            "pg-constant", "--calib-blocks", "8", "--batch-size", "4", "--steps", "3", "--ppl128-windows", "8",
            "--ppl2048-windows", "1", "--limit", "0", "--results", str(out / "q.json")]
    assert main(argv) == 0
    state = json.loads((out / "q.json").read_text())
    rows = {r["method"]: r for r in state["rows"]}
    assert list(rows) == ["dense", "random", "flap", "pg-constant"]
    assert rows["dense"]["kv_groups"] == 6 and rows["random"]["kv_groups"] == 3
    assert rows["flap"]["mlp_channels"] == 144 and rows["flap"]["peak_mib"] >= 0
    assert all(math.isfinite(r["ppl128"]) and math.isfinite(r["ppl2048"]) for r in rows.values())
    assert state["eval"] == {"ppl128_windows": 8, "ppl2048_windows": 1, "calib_tokens": 8 * 128}
    assert state["machine"]["versions"]["torch"] and state["commands"][0].startswith("pg-prune")
    # resume adds only the missing rows; other settings are refused
    assert main([*argv[:6], "random", "magnitude", *argv[8:], "--resume"]) == 0
    assert [r["method"] for r in json.loads((out / "q.json").read_text())["rows"]][-1] == "magnitude"
    assert main([*argv, "--resume", "--steps", "4"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "mmlu_pro_xx"], "unknown zero-shot task"),
    (["--ratios", "0", "0.5"], "each must be in"),
    (["--calib-blocks", "4"], "fewer than one batch"),
])
def test_compare_bad_input_before_loading(extra, message, tmp_path, capsys):
    assert main(["compare", "--model", "/nonexistent/model", "--results", str(tmp_path / "q.json"), *extra]) == 2
    assert message in capsys.readouterr().err
