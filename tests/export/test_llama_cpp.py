"""The exported GGUF in llama.cpp against transformers (docs/serving.md).

These tests run when node and the node-llama-cpp package are found (``PG_PRUNING_NODE_LLAMA_CPP=DIR`` after
``npm install --prefix DIR node-llama-cpp@3.22.1``; ``make test-llama-cpp``).
"""

import pytest
import torch

from pg_pruning_plugin import SearchSpace, UnitValues, prune_model
from pg_pruning_plugin.export import compare_with_llama_cpp, export_gguf
from tests.helpers import LLAMA_CPP_RUNTIME as RUNTIME
from tests.helpers import gguf_fields, gguf_model, heterogeneous_gguf_model, needs_llama_cpp, random_masks


def _prompts(tok):
    return [tok("The capital of France is")["input_ids"], [5, 17, 900, 33, 4000, 12]]


@needs_llama_cpp
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_llama_cpp_greedy_tokens_and_logits_match_transformers(model_type, tok, tmp_path):
    model = heterogeneous_gguf_model(model_type, tok)
    path = export_gguf(model, tmp_path / "m.gguf", tok)
    for c in compare_with_llama_cpp(model, path, _prompts(tok), n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal, (c.transformers, c.llama_cpp)
        assert c.max_abs_logit_diff < 1e-4 * c.max_abs_logit + 1e-4


@needs_llama_cpp
def test_llama_cpp_uniform_llama_arch(tok, tmp_path):
    model = gguf_model("llama", tok, num_hidden_layers=2, tie_word_embeddings=False)
    space = SearchSpace.from_model(model)
    masks = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units))
    masks.attn[space.attn_offsets[0]] = masks.attn[space.attn_offsets[1]] = 0
    masks.mlp[space.mlp_slice(0)][:32] = masks.mlp[space.mlp_slice(1)][:32] = 0
    prune_model(model, masks)
    path = export_gguf(model, tmp_path / "u.gguf", tok)
    assert gguf_fields(path)[1]["general.architecture"] == "llama"
    for c in compare_with_llama_cpp(model, path, _prompts(tok), n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal and c.max_abs_logit_diff < 1e-4 * c.max_abs_logit + 1e-4


@needs_llama_cpp
@pytest.mark.real_model
def test_llama_cpp_matches_transformers_on_pruned_smollm2(tmp_path):
    from pg_pruning_plugin.resources.models import load_model

    model, tok = load_model()
    space = SearchSpace.from_model(model)
    widths = random_masks(space, keep=0.7, seed=3)
    attn_blocks, mlp_blocks = torch.ones(space.num_layers), torch.ones(space.num_layers)
    attn_blocks[[0, 7, 19]] = 0
    mlp_blocks[[12, 19, 25]] = 0  # layer 19 disappears
    prune_model(model, UnitValues(widths.attn, widths.mlp, attn_blocks, mlp_blocks))
    path = export_gguf(model, tmp_path / "smollm2.gguf", tok)
    assert gguf_fields(path)[1]["deci.block_count"] == 29
    for c in compare_with_llama_cpp(model, path, _prompts(tok)[:1], n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal, (c.transformers, c.llama_cpp)
        assert c.max_abs_logit_diff < 1e-3
