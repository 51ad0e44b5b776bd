"""bench/refit_choices.py runs every choice to its report on a tiny model (smoke test)."""

import json

import refit_choices

from tests.helpers import save_tiny


def test_refit_choices(tok, tmp_path):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, max_position_embeddings=2048)
    record, out = tmp_path / "choices.json", tmp_path / "choices.md"
    argv = ["--model", str(model_dir), "--calib-blocks", "16", "--windows-128", "2", "--windows-2048", "1",
            "--choices", "0", "1", "2", "3", "--json", str(record), "--out", str(out)]
    refit_choices.main(argv)
    rows = json.loads(record.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "bias", "lstsq", "lstsq"]
    assert rows[2]["errors"]["down_proj"][1] <= rows[2]["errors"]["down_proj"][0]
    assert "| lstsq, target: the dense model's own outputs |" in out.read_text()
