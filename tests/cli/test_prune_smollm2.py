"""End to end on the real SmolLM2-135M weights: the default command (allocation search, least-squares refit,
Wanda-sp beside it) with a very short search."""

import json

import pytest
import torch

from pg_pruning_plugin import SearchResult, load_pruned
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.refit import refit
from pg_pruning_plugin.reporting import REPORT_FILE
from pg_pruning_plugin.resources.models import load_model
from pg_pruning_plugin.resources.text import calibration_blocks

pytestmark = pytest.mark.real_model


def test_prune_command_on_smollm2(tmp_path, capsys):
    out = tmp_path / "smollm2-pruned"
    argv = ["prune", "--output", str(out), "--steps", "2", "--calib-blocks", "48", "--eval-windows", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity: dense" in printed and "allocation search, refit lstsq" in printed
    assert "same budget, same refit, same windows: wanda-sp" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["params_after"] < report["params_before"]
    assert (out / "kept_per_layer.png").stat().st_size > 0
    assert not (tmp_path / "smollm2-pruned.search-state.pt").exists()
    # one budget: 30 % of the prunable parameters, never more kept than requested
    prunable = report["accounting"]["prunable_params"]
    assert prunable["kept"] <= prunable["requested"] == pytest.approx(0.7 * prunable["dense"], rel=1e-4)
    assert report["evaluation"]["baseline"]["method"] == "wanda-sp"
    assert report["evaluation"]["baseline"]["refit"] == report["refit"]["method"] == "lstsq"
    pruned_layers = [p for p in report["refit"]["projections"] if p["kept"] < p["width"]]
    assert pruned_layers and all(p["error_after"] <= p["error_before"] for p in pruned_layers)

    # The saved model computes what the dense model computes after the same refit on the same 48 blocks
    # (the refit zeroes the removed units' output columns, so the unpruned refitted model is the reference).
    result = SearchResult.load(out / "search_result.pt")
    dense, tokenizer = load_model()
    refit(dense, result.masks, calibration_blocks(tokenizer, "wiki-vital", 128, 48, seed=42), "lstsq",
          progress=False)
    pruned = load_pruned(out)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-3)

    # An existing output is never overwritten without --overwrite.
    assert main(argv) == 2
