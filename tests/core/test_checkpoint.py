"""save_pruned refuses what could not be loaded or would destroy the input; the saved config tells the truth
about per-layer widths, and stock from_pretrained never loads a heterogeneous plain checkpoint silently."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_pruning_plugin import SearchSpace, load_pruned, prune_model, save_pruned
from pg_pruning_plugin.core.slicing import slice_projection
from tests.helpers import random_masks, tiny_model


def test_a_model_pruned_behind_its_config_is_refused(tmp_path):
    model = tiny_model()
    slice_projection(model.model.layers[1].mlp.gate_proj, torch.arange(40), 0)  # no config update
    slice_projection(model.model.layers[1].mlp.up_proj, torch.arange(40), 0)
    slice_projection(model.model.layers[1].mlp.down_proj, torch.arange(40), 1)
    with pytest.raises(ValueError, match="layer 1: the config records 8 query heads, 2 KV heads and 96 MLP channels, "
                                         "but its weights hold 8, 2 and 40"):
        save_pruned(model, tmp_path / "out")
    model.model.layers[0].self_attn.k_proj.out_features -= 16  # Torch-Pruning's duplicated-index count (bug 3b)
    with pytest.raises(ValueError, match="k_proj: in/out_features"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_source_directory_is_never_the_output(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    prune_model(model, random_masks(SearchSpace.from_model(model)))
    for output in (tmp_path / "model", tmp_path / "model" / "pruned", tmp_path):
        with pytest.raises(ValueError, match="input model"):
            save_pruned(model, output, overwrite=True)
    assert load_pruned(save_pruned(model, tmp_path / "elsewhere"))


def test_heterogeneous_config_states_widths_some_layer_has(tmp_path):
    model = tiny_model()
    prune_model(model, random_masks(SearchSpace.from_model(model)))
    save_pruned(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    widths = saved["pruned_layers"]
    assert len({w["intermediate_size"] for w in widths}) > 1  # heterogeneous
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert saved[key] == max(w[key] for w in widths)  # the widest layer's, not the unpruned 96 / 8 / 2
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):  # never a silent load
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        ids = torch.randint(0, 200, (1, 8))
        assert torch.equal(load_pruned(tmp_path / "out")(ids).logits, model(ids).logits)
