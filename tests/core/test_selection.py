"""Selection rules: the top-k hard mask per layer and globally, rounding, the expected-width rule."""

import pytest
import torch

from pg_pruning_plugin.core.selection import kept_count, nearest_multiple, removed_count, top_k_mask


def test_top_k_global_keeps_budget_and_one_unit_per_layer():
    s = torch.cat([torch.zeros(10), torch.ones(10)])  # layer 0 would be emptied by a plain global top-k
    mask = top_k_mask(s, 0.5, [0, 10, 20], global_pool=True)
    assert mask.sum() == 10  # the reserved unit counts against the budget
    assert mask[:10].sum() == 1 and mask[10:].sum() == 9


def test_top_k_per_layer_and_rounding():
    s = torch.rand(200)
    mask = top_k_mask(s, 0.7, [0, 100, 200], global_pool=False)
    assert mask[:100].sum() == 70 and mask[100:].sum() == 70
    rounded = top_k_mask(s, 0.7, [0, 100, 200], global_pool=False, round_to=32)
    assert rounded[:100].sum() == 64 and rounded[100:].sum() == 64
    # the kept units are the most probable ones of each layer
    assert s[:100][rounded[:100].bool()].min() >= s[:100][~rounded[:100].bool()].max()


def test_expected_width_rule_gives_each_layer_its_expected_count():
    s = torch.cat([torch.full((10,), 0.9), torch.full((10,), 0.3)])
    s[:10] += torch.linspace(0, 0.05, 10)  # distinct within layers
    mask = top_k_mask(s, 0.6, [0, 10, 20], global_pool=True, rule="expected-width")
    assert mask.sum() == 12  # exact budget
    assert mask[:10].sum() == 9 and mask[10:].sum() == 3  # proportional to Σ s per layer (9.x : 3)
    with pytest.raises(ValueError, match="unknown mask rule"):
        top_k_mask(s, 0.6, [0, 10, 20], global_pool=True, rule="bogus")


def test_count_and_rounding_rules():
    assert removed_count(46080, 0.3) == 13824 and kept_count(90, 0.7) == 63
    assert [nearest_multiple(c, 64, 1536) for c in (1076, 1055, 30, 1600)] == [1088, 1024, 64, 1536]
    assert nearest_multiple(95, 64, 96 // 64 * 64) == 64  # capped at the largest multiple within 96
