"""Presets: the authors' configuration reproduces the per-unit search of the paper bit for bit."""

import json
from pathlib import Path

import pytest
import torch

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig
from pg_pruning_plugin.search.allocation_search import AllocationSearch
from tests.helpers import tiny_model

# Written by the per-unit search before the presets existed (SearchConfig defaults were the authors' then),
# on the same tiny model, calibration and settings as below.
# Stored as text: {"dtype": ..., "values": [...]} for each tensor, exact for float32.


def _tensors(node):
    if isinstance(node, dict) and set(node) == {"dtype", "values"}:
        return torch.tensor(node["values"], dtype=getattr(torch, node["dtype"]))
    return {k: _tensors(v) for k, v in node.items()} if isinstance(node, dict) else node


REFERENCE = _tensors(json.loads((Path(__file__).parent / "data" / "authors_reference.json").read_text()))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_authors_preset_is_the_paper_search_bit_for_bit(name):
    ref = REFERENCE[name]
    calib = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(7))
    config = SearchConfig(preset="authors", steps=8, batch_size=4, init_batches=4, **ref["config"])
    search = PolicyGradientSearch(tiny_model("llama"), calib, config)
    assert type(search) is PolicyGradientSearch
    result = search.run(progress=False)
    assert result.history["loss"] == ref["loss"]
    for kind, value in ref["probs"].items():
        assert torch.equal(getattr(result.probs, kind), value), kind
    for kind, value in ref["masks"].items():
        assert torch.equal(getattr(result.masks, kind), value), kind


def test_presets_fill_only_what_is_not_given():
    authors = SearchConfig(preset="authors")
    assert (authors.policy, authors.lr, authors.loss, authors.samples_per_step, authors.steps) == (
        "units", 2e-3, "ce", 2, 15000)
    ours = SearchConfig(preset="allocation")
    assert (ours.policy, ours.loss, ours.cost, ours.execution) == ("allocation", "kl", "params", "gather")
    assert SearchConfig(preset="authors", lr=0.01).lr == 0.01
    units = SearchConfig(policy="units")  # a policy given alone takes that policy's preset defaults
    assert (units.lr, units.execution) == (2e-3, "mask")


def test_the_allocation_preset_builds_the_allocation_search():
    calib = torch.randint(0, 200, (48, 16))
    config = SearchConfig(preset="allocation", steps=2)
    assert isinstance(PolicyGradientSearch(tiny_model("llama"), calib, config), AllocationSearch)


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="fast"), "preset="),
    (dict(policy="greedy"), "policy="),
    (dict(loss="mse"), "loss="),
    (dict(granularity="depth"), "allocation policy searches widths"),
    (dict(attn_sparsity=0.2), "one budget"),
    (dict(execution="mask"), "execution must be 'gather'"),
    (dict(ranking="taylor"), "ranking="),
    (dict(loop_refit="ols"), "loop_refit="),
    (dict(block_size=0), "block_size"),
    (dict(incumbent_every=-1), "incumbent_every"),
    (dict(held_in_blocks=2), "held_in_blocks >= batch_size"),
    (dict(refit_damping=0.0), "refit_damping"),
])
def test_bad_allocation_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**({"preset": "allocation"} | kwargs))
