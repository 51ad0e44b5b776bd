"""`pg-prune bench`: search speed and pruned-model inference speed of a tiny random shape, to a JSON file."""

from __future__ import annotations

import json

from pg_pruning_plugin.cli import main
from pg_pruning_plugin.evaluation import speed


def test_bench_command_measures(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(speed.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, vocab_size=200, max_position_embeddings=64))
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--batch-size", "2", "--seq-len", "8",
            "--prompt-len", "4", "--new-tokens", "3", "--sparsities", "0.5", "--gen-batch-sizes", "1", "2",
            "--round-to", "8", "--json", str(tmp_path / "runs" / "tiny.json")]
    assert main([*argv, "--sample-sparsity", "1.5"]) == 2
    assert "sparsities must be in (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--skip", "memory"]) == 0
    result = json.loads((tmp_path / "runs" / "tiny.json").read_text())
    seconds = result["search"]["seconds"]
    assert seconds["dense forward"] > 0 and "search step (2 samples), gather" in seconds
    rows = {(r["sparsity"], r["batch_size"]): r for r in result["inference"]}
    assert set(rows) == {(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)}
    assert rows[0.5, 1]["params"] < rows[0.0, 1]["params"] and rows[0.5, 1]["mlp_channels"] == 64
    assert rows[0.5, 1]["kv_groups"] == 2
    assert all(not r["decode_tok_s"] <= 0 for r in rows.values())  # NaN: lost in timing noise
    assert result["machine"]["cores"] >= 1
