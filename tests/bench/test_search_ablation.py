"""bench/search_ablation.py runs every variant to its report on a tiny model (smoke test)."""

import json

import search_ablation

from tests.helpers import save_tiny


def test_search_ablation(tok, tmp_path):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, max_position_embeddings=2048, intermediate_size=128)
    record, out = tmp_path / "ablation.json", tmp_path / "ablation.md"
    argv = ["--model", str(model_dir), "--sparsity", "0.3", "--steps", "2", "--calib-blocks", "48", "--windows-128",
            "2", "--windows-2048", "1", "--json", str(record), "--out", str(out),
            "--variants", "units + all of 1, 3-6", "allocation start (OBS ranks, uniform widths)",
            "allocation + least squares + KL + incumbent (default)"]
    search_ablation.main(argv)
    rows = json.loads(record.read_text())["rows"]
    assert [r["variant"] for r in rows][0] == "dense" and len(rows) == 1 + 3 * 2
    assert all(r["ppl128"] > 1 for r in rows)
    search_ablation.main([*argv, "--resume"])  # nothing left to measure
    assert len(json.loads(record.read_text())["rows"]) == 7
    assert "| allocation + least squares + KL + incumbent (default) | 2-6 | lstsq |" in out.read_text()
