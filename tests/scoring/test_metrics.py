"""Initial metrics: block influence, and the metrics the baselines share."""

import pytest
import torch

from pg_pruning_plugin import SearchSpace, compute_metric
from pg_pruning_plugin.scoring.metrics import METRICS, block_influence
from tests.helpers import ARCH_CASES, ARCH_IDS, tiny_model


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_block_influence_is_zero_for_a_block_that_changes_nothing(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    batches = [torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))]
    influence = block_influence(model, space, batches, progress=False)
    assert influence.attn.shape == influence.mlp.shape == influence.layer.shape == (3,)
    assert ((influence.attn > 0) & (influence.attn <= 2)).all()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    assert block_influence(model, space, batches, progress=False).mlp[1].abs() < 1e-6


def test_every_metric_scores_every_unit(llama):
    space = SearchSpace.from_model(llama)
    batches = [torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))]
    was_training = llama.train().training
    for method in METRICS:
        scores = compute_metric(llama, space, method, batches, keep_ratio=0.5, progress=False)
        assert scores.attn.shape == (space.num_attn_units,) and scores.mlp.shape == (space.num_mlp_units,)
        assert torch.isfinite(scores.attn).all() and torch.isfinite(scores.mlp).all()
    assert was_training and llama.training  # the training flag is restored
