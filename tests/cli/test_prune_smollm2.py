"""End to end on the real SmolLM2-135M weights: the default command with a very short search."""

import json

import pytest
import torch

from pg_pruning_plugin import SearchResult, SearchSpace, UnitMasks, load_pruned, masked
from pg_pruning_plugin.cli import main
from pg_pruning_plugin.reporting import REPORT_FILE
from pg_pruning_plugin.resources.models import load_model

pytestmark = pytest.mark.real_model


def test_prune_command_on_smollm2(tmp_path, capsys):
    out = tmp_path / "smollm2-pruned"
    argv = ["prune", "--output", str(out), "--steps", "3", "--batch-size", "2", "--init-batches", "1",
            "--eval-windows", "2", "--sparsity", "0.3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity: dense" in printed and "parameters" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["params_after"] < report["params_before"]
    assert (out / "kept_per_layer.png").stat().st_size > 0
    assert not (tmp_path / "smollm2-pruned.search-state.pt").exists()

    # The saved model computes what the dense model computes under the learned masks.
    result = SearchResult.load(out / "search_result.pt")
    dense, _ = load_model()
    pruned = load_pruned(out)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(dense, SearchSpace.from_model(dense), UnitMasks(result.masks.attn, result.masks.mlp)):
        reference = dense(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=1e-4, atol=1e-3)
    # 30 % of the 90 KV groups (int(90 * 0.3) = 27 removed) and of the 46,080 MLP channels.
    assert sum(layer["kv_heads"] for layer in report["kept_per_layer"]) == 90 - 27
    assert sum(layer["mlp"] for layer in report["kept_per_layer"]) == 46080 - int(46080 * 0.3)

    # An existing output is never overwritten without --overwrite.
    assert main(argv) == 2
