"""Initial keep-probabilities from a metric (method.md §7.2)."""

import pytest
import torch

from pg_pruning_plugin.core.selection import top_k_mask
from pg_pruning_plugin.search.init import scores_from_metric


def test_sigmap_mean_is_the_init_rate_and_order_is_kept():
    metric = torch.randn(1000)
    s = scores_from_metric(metric, 0.7)
    assert abs(float(s.mean()) - 0.7) < 0.02
    assert torch.equal(torch.argsort(s[s < 1]), torch.argsort(metric[s < 1]))
    with pytest.raises(ValueError, match="unknown score mapping"):
        scores_from_metric(metric, 0.7, "bogus")


def test_mask_mapping_starts_from_the_per_layer_init_mask():
    metric = torch.randn(50)
    s = scores_from_metric(metric, 0.6, "mask", confidence=0.8)
    torch.testing.assert_close(s.unique(), torch.tensor([0.2, 0.8]))
    assert torch.equal(s > 0.5, top_k_mask(metric, 0.6, [0, 50], global_pool=False).bool())
