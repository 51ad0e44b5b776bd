"""Every bench/ script runs to its report on a tiny model with the real tokenizer (smoke tests, seconds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import depth_budget
import estimators
import llmcompressor_quant
import pytest
import quality_report
import search_ablation
import search_vs_init
import speed_report

from pg_pruning_plugin.cli import main as pg_prune
from pg_pruning_plugin.evaluation import speed
from tests.helpers import REPO, save_tiny


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    """A tiny Llama with the SmolLM2 vocabulary that allows 2048-token windows."""
    path = tmp_path_factory.mktemp("bench") / "tiny"
    save_tiny(path, tok, max_position_embeddings=2048)
    return path


def test_depth_budget(model_dir, tmp_path):
    out = tmp_path / "depth.md"
    argv = ["--model", str(model_dir), "--sparsity", "0.3", "--steps", "2", "--batch-size", "2", "--init-batches", "1",
            "--windows-128", "2", "--windows-2048", "1", "--out", str(out)]
    depth_budget.main(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["rows"]) == 1 + 4 + 2 and "ShortGPT" in record["rows"][-1]["method"]
    assert "| 30% | depth (blocks), parameter budget |" in out.read_text()
    depth_budget.main([*argv, "--resume"])  # nothing left to measure
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 7
    depth_budget.main(["--out", str(out), "--render-only"])
    assert "Machine:" in out.read_text()


def test_search_vs_init(model_dir, tmp_path):
    out = tmp_path / "svi.md"
    search_vs_init.main(["--model", str(model_dir), "--sparsity", "0.5", "--steps", "2", "--batch-size", "2",
                         "--init-batches", "1", "--eval-windows", "2", "--out", str(out)])
    assert "after search, global top-k" in out.read_text()
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 1


def test_estimators(model_dir, tmp_path):
    record = tmp_path / "est.json"
    estimators.main(["--model", str(model_dir), "--steps", "2", "--search-steps", "2", "--init-batches", "1",
                     "--eval-windows", "2", "--searches", "authors:2:4", "antithetic:2:4", "--trace-every", "1",
                     "--target-ppl", "1e9", "--json", str(record)])
    rows = json.loads(record.read_text())["rows"]
    assert {r["part"] for r in rows} == {"noise", "search"}
    assert [r["estimator"] for r in rows if r["part"] == "search"] == ["authors", "antithetic"]
    assert all(r["forwards_to_target"]["1000000000.0"] == 2 for r in rows if r["part"] == "search")


def test_search_ablation(model_dir, tmp_path):
    record, out, notes = tmp_path / "ablation.json", tmp_path / "ablation.md", tmp_path / "notes.md"
    notes.write_text("What the rows say.")
    variants = ["allocation start (OBS ranks, uniform widths)", "allocation + least squares + KL + incumbent (default)",
                "units + all of 1, 3-6"]
    argv = ["--model", str(model_dir), "--steps", "2", "--calib-blocks", "48", "--windows-128", "2", "--windows-2048",
            "1", "--json", str(record), "--out", str(out), "--notes", str(notes)]
    search_ablation.main([*argv, "--variants", *variants[:2]])
    search_ablation.main([*argv, "--resume", "--variants", *variants])  # measures only the third
    data = json.loads(record.read_text())
    assert [(r["variant"], r["refit"]) for r in data["rows"]] == [("dense", "-")] + [
        (v, refit) for v in variants for refit in ("none", "lstsq")]
    assert all(math.isfinite(r["ppl128"]) for r in data["rows"])
    text = out.read_text()
    assert "| units + all of 1, 3-6 | 1,3,4,5,6 | lstsq |" in text and text.rstrip().endswith("What the rows say.")


def test_llmcompressor_quant(model_dir, tmp_path):
    out = tmp_path / "llmc"
    llmcompressor_quant.main(["--model", str(model_dir), "--steps", "2", "--num-samples", "48", "--eval-windows", "2",
                              "--load-repeats", "1", "--out", str(out)])
    record = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in record["rows"]] == ["dense", "pg30", "pg30-norefit", "pg30-w4a16-g64",
                                                   "pg30-norefit-w4a16-g64"]
    # the tiny model's 96-channel MLPs are levels of 48 alone and multiples of 64 under group 64: the runs'
    # widths may differ here, and the record says whether they did
    assert isinstance(record["same_pruning_in_every_run"], bool) and (out / "pg30.log").stat().st_size > 0
    assert [r["refit"] for r in record["rows"]] == [None, "lstsq", "none", "lstsq", "none"]
    assert "| pg30-w4a16-g64 |" in (out / "results.md").read_text()


def test_quality_report_renders_a_compare_run(model_dir, tmp_path):
    results = tmp_path / "q.json"
    assert pg_prune(["compare", "--model", str(model_dir), "--ratios", "0.5", "--methods", "random", "shortgpt",
                     "search", "--refit", "none", "lstsq", "--calib-blocks", "40", "--calib-seq-len", "32",
                     "--batch-size", "4", "--steps", "2", "--ppl128-windows", "2", "--ppl2048-windows", "1",
                     "--limit", "0", "--results", str(results)]) == 0
    rows = json.loads(results.read_text())["rows"]
    assert all(math.isfinite(r["ppl2048"]) for r in rows)
    notes = tmp_path / "notes.md"
    notes.write_text("Read by hand.")
    quality_report.main([str(results), "--out", str(tmp_path / "q.md"), "--plot", str(tmp_path / "q.png"),
                         "--notes", str(notes)])
    report = (tmp_path / "q.md").read_text()
    assert "| ShortGPT, whole layers | lstsq |" in report and "PG search, authors configuration" in report
    assert "Zero-shot: not measured" in report and "Read by hand." in report
    assert (tmp_path / "q.png").stat().st_size > 0


def _synthetic_state() -> dict:
    """A compare record: dense, two ratios of three baselines and one search configuration × three refits,
    zero-shot for dense, the best baseline and the search."""
    def evaluated(ppl: float, removed: float) -> dict:
        return {"ppl128": ppl, "ppl2048": 0.8 * ppl, "params": 1000, "prunable_params": int(800 * (1 - removed)),
                "kv_groups": 60, "mlp_channels": 30000, "layers": 30, "prunable_removed": removed}

    def zero_shot(acc: float) -> dict:
        return {"tasks": {"boolq": {"acc": acc, "acc_stderr": 0.035}, "piqa": {"acc": acc + 0.1, "acc_stderr": 0.03}},
                "mean": acc + 0.05, "mean_stderr": 0.023, "limit": 200}

    rows = [{"method": "dense", "ratio": 0.0, "refit": "none", "structure": "-", **evaluated(17.7, 0.0),
             "zero_shot": zero_shot(0.6)}]
    for ratio, scale in ((0.3, 1.0), (0.5, 8.0)):
        for method, base in (("random", 900.0), ("flap", 60.0), ("shortgpt", 300.0), ("pg-default", 50.0)):
            for refit, factor in (("none", 1.0), ("bias", 0.9), ("lstsq", 0.7)):
                row = {"method": method, "ratio": ratio, "refit": refit, "structure": "global",
                       "selection_seconds": 12.0, "selection_peak_mib": 300.0, "refit_seconds": 30.0,
                       "refit_peak_mib": 120.0, "reused_statistics": method == "flap" and ratio == 0.5,
                       **evaluated(base * scale * factor, ratio)}
                if method.startswith("pg-"):
                    row |= {"structure": "search", "first_loss": 4.1, "last_loss": 3.2}
                if refit == "lstsq" and method in ("flap", "pg-default"):
                    row["zero_shot"] = zero_shot(0.5 if method == "flap" else 0.52)
                rows.append(row)
    return {"settings": {"model": "smollm2-135m", "calib_text": "wiki-vital", "calib_blocks": 128, "calib_seq_len": 128,
                         "batch_size": 8, "seed": 42, "damping": 0.01, "eval_text": "wiki-vital", "ppl128_windows": 64,
                         "ppl2048_windows": 2, "limit": 200, "dtype": "float32", "tasks": ["boolq", "piqa"],
                         "steps": {}},
            "eval": {"ppl128_windows": 64, "ppl2048_windows": 2, "calib_tokens": 16384}, "rows": rows,
            "commands": ["pg-prune compare --results q.json"], "wall_seconds": 600.0,
            "machine": {"cpu": "test CPU", "cores": 2, "torch_threads": 2, "load_average": 0.1,
                        "versions": {"torch": "2.x"}}}


def test_quality_report_renders_every_section_from_a_synthetic_record(tmp_path):
    record = tmp_path / "q.json"
    record.write_text(json.dumps(_synthetic_state()))
    quality_report.main([str(record), "--out", str(tmp_path / "q.md"), "--plot", str(tmp_path / "q.png")])
    report = (tmp_path / "q.md").read_text()
    sections = ["## Dense model", "## 30% of the prunable parameters removed", "## 50% of the prunable parameters "
                "removed", "## Best refit per method", "## Does the search beat", "![PPL@128", "## Zero-shot accuracy"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "16,384 tokens" in report and "seed 42" in report and "used exactly these blocks" in report
    flap = "| FLAP, per-type adaptive |"
    assert f"{flap} lstsq | 42.00 | 33.60 | 30.00% | 60 | 30000 | 30 | 12 | 30 | 300 / 120 |" in report
    assert f"{flap} 42.00 (lstsq; none 60.00) | 336.00 (lstsq; none 480.00) |" in report
    assert "12*" in report  # statistics reused at 50 %
    assert ("- 30%, PPL@128: the best search row (PG search, default configuration, refit lstsq, 35.00) beats the "
            "best baseline (FLAP, per-type adaptive, refit lstsq, 42.00)") in report
    assert f"| 30% | best-baseline {flap} lstsq | 200 | 0.500 ± 0.035 | 0.600 ± 0.030 | 0.5500 ± 0.0230 |" in report
    assert "| 0% | dense | dense | none | 200 |" in report and "0.6500 ± 0.0230" in report
    assert "first 200 documents per task" in report
    assert (tmp_path / "q.png").stat().st_size > 0


def test_speed_report_renders_bench_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(speed.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, vocab_size=200, max_position_embeddings=64))
    runs = tmp_path / "runs"
    assert pg_prune(["bench", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--batch-size", "2",
                     "--seq-len", "8", "--prompt-len", "4", "--new-tokens", "3", "--sparsities", "0.5",
                     "--gen-batch-sizes", "1", "2", "--round-to", "8", "--skip", "memory",
                     "--json", str(runs / "cpu-tiny.json")]) == 0
    (runs / "NOTES.md").write_text("Hand-written analysis.")
    speed_report.main([str(runs), "--out", str(tmp_path / "speed.md")])
    report = (tmp_path / "speed.md").read_text()
    assert report.index("Hand-written analysis.") < report.index("| search step (2 samples), gather |")
    assert "| 50% | 2 |" in report


def test_distributed_estimates(tmp_path):
    import distributed_estimates

    out = tmp_path / "estimates.md"
    distributed_estimates.main([str(REPO / "docs/results/speed/cuda-llama-3-8b-search-memory.json"), "--out", str(out)])
    text = out.read_text()
    assert "**Estimates, not measurements**" in text and "| 70B | 4 (2) | units, K = 4 | 4 x 1 |" in text
