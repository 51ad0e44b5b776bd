"""GGUF export for llama.cpp (docs/serving.md).

The metadata tests always run. The llama.cpp tests run when node and the node-llama-cpp package are
found (``PG_PRUNING_NODE_LLAMA_CPP=DIR`` after ``npm install --prefix DIR node-llama-cpp@3.22.1``).
"""

import json

import gguf
import numpy as np
import pytest
import torch

from pg_pruning_plugin import SearchSpace, UnitScores, prune_model, save_pruned
from pg_pruning_plugin.export.gguf import (NODE_LLAMA_CPP_ENV, NODE_LLAMA_CPP_VERSION, compare_with_llama_cpp, export_gguf,
                                      find_node_llama_cpp, permute_for_llama_cpp_rope)
from pg_pruning_plugin.resources.models import load_tokenizer
from tests.tiny_models import random_masks, tiny_model

RUNTIME = find_node_llama_cpp()
needs_llama_cpp = pytest.mark.skipif(
    RUNTIME is None, reason=f"llama.cpp runtime not found: `npm install --prefix DIR node-llama-cpp@"
                            f"{NODE_LLAMA_CPP_VERSION}` and set {NODE_LLAMA_CPP_ENV}=DIR (node >= 20 on PATH)")

# 5 layers: L0 loses its attention, L2 both blocks (deleted), L3 its MLP, L4 its attention; L0/L1 lose some
# channels, L1 one of its two KV groups. Written GGUF layers: heads [1*, 4, 8, 0], KV [1*, 1, 2, 0],
# MLP [56, 95, 1*, 96] (* = zero stand-ins for llama.cpp's deci graph).
GGUF_HEADS, GGUF_KV, GGUF_FF = [1, 4, 8, 0], [1, 1, 2, 0], [56, 95, 1, 96]
TRUE_WIDTHS = [(0, 0, 56), (4, 1, 95), (8, 2, 0), (0, 0, 96)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _tiny(model_type, tok, **overrides):
    settings = dict(vocab_size=len(tok), num_hidden_layers=5, max_position_embeddings=512, initializer_range=0.2,
                    tie_word_embeddings=True)  # tied as in SmolLM2; wide init for clear argmax margins
    return tiny_model(model_type, **(settings | overrides))


def _heterogeneous(model_type, tok, **overrides):
    model = _tiny(model_type, tok, **overrides)
    space = SearchSpace.from_model(model)
    masks = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.0, 1, 0, 1, 0]), torch.tensor([1.0, 1, 0, 0, 1]))
    masks.mlp[space.mlp_slice(0)][:40] = 0
    masks.mlp[space.mlp_offsets[1] + 3] = 0
    masks.attn[space.attn_offsets[1]] = 0
    return prune_model(model, masks).requires_grad_(False)


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_permutation_interleaves_the_two_halves_of_each_head():
    rows = torch.arange(16.0)  # two heads of 8
    assert permute_for_llama_cpp_rope(rows, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    with pytest.raises(ValueError, match="whole heads"):
        permute_for_llama_cpp_rope(torch.zeros(12, 3), 8)


def test_heterogeneous_widths_and_removed_blocks_as_per_layer_arrays(tok, tmp_path):
    model = _heterogeneous("llama", tok)
    path = export_gguf(model, tmp_path / "m.gguf", tok)
    reader, kv = _fields(path)
    assert kv["general.architecture"] == "deci" and kv["deci.block_count"] == 4
    assert kv["deci.attention.head_count"] == GGUF_HEADS
    assert kv["deci.attention.head_count_kv"] == GGUF_KV
    assert kv["deci.feed_forward_length"] == GGUF_FF
    assert kv["deci.attention.key_length"] == kv["deci.rope.dimension_count"] == 16
    recorded = json.loads(kv["pg_pruning_plugin.pruned_layers"])
    widths = [(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]) for w in recorded]
    assert widths == TRUE_WIDTHS
    # tokenizer metadata copied from the embedded SmolLM2 GGUF (same vocabulary)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    assert len(kv["tokenizer.ggml.tokens"]) == len(tok) == kv["deci.vocab_size"]

    tensors = {t.name: t for t in reader.tensors}
    assert not any(n.startswith("blk.3.attn") for n in tensors)  # attention-free layer: no attention tensors
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    layers = model.model.layers
    q = tensors["blk.1.attn_q.weight"]
    assert [int(n) for n in q.shape] == [64, 4 * 16]  # ggml order: (in, out)
    np.testing.assert_array_equal(q.data, permute_for_llama_cpp_rope(layers[1].self_attn.q_proj.weight, 16).numpy())
    k = tensors["blk.1.attn_k.weight"]
    np.testing.assert_array_equal(k.data, permute_for_llama_cpp_rope(layers[1].self_attn.k_proj.weight, 16).numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"].data, layers[1].self_attn.v_proj.weight.numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"].data, layers[0].mlp.down_proj.weight.numpy())
    for stand_in in ("blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.2.ffn_gate.weight",
                     "blk.2.ffn_down.weight"):
        assert not tensors[stand_in].data.any()
    assert [int(n) for n in tensors["blk.2.ffn_down.weight"].shape] == [1, 64]


def test_uniform_widths_stay_llama_and_f16_keeps_norms_f32(tok, tmp_path):
    model = _tiny("llama", tok, num_hidden_layers=2, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "u.gguf", tok, dtype="f16")
    reader, kv = _fields(path)
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv["llama.attention.head_count"] == 8 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.feed_forward_length"] == 96
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.F16


def test_qwen2_biases_are_permuted_like_their_rows(tok, tmp_path):
    model = _heterogeneous("qwen2", tok)
    reader, _ = _fields(export_gguf(model, tmp_path / "q.gguf", tok))
    tensors = {t.name: t for t in reader.tensors}
    attn = model.model.layers[1].self_attn
    np.testing.assert_array_equal(tensors["blk.1.attn_q.bias"].data, permute_for_llama_cpp_rope(attn.q_proj.bias, 16))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.bias"].data, attn.v_proj.bias.numpy())


def test_tokenizer_built_from_hf_matches_the_smollm2_gguf(tok, tmp_path):
    model = _tiny("llama", tok, num_hidden_layers=1)
    _, copied = _fields(export_gguf(model, tmp_path / "copied.gguf", tok))
    _, built = _fields(export_gguf(model, tmp_path / "built.gguf", tok, tokenizer_pre="smollm"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token"):
        assert built[key] == copied[key], key


def test_refusals(tok, tmp_path):
    model = _tiny("llama", tok, num_hidden_layers=1)
    out = export_gguf(model, tmp_path / "a.gguf", tok)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(model, out, tok)
    export_gguf(model, out, tok, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temporary files left behind
    with pytest.raises(ValueError, match=r"\.gguf"):
        export_gguf(model, tmp_path / "a.bin", tok)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, tmp_path / "b.gguf", tok, dtype="q4_0")
    for model_type, message in (("qwen3", "q/k RMSNorms"), ("gemma", "GELU")):
        with pytest.raises(ValueError, match=message):
            export_gguf(tiny_model(model_type, num_hidden_layers=1), tmp_path / "c.gguf", tok)
    assert not (tmp_path / "c.gguf").exists()


def test_cli_exports_a_pruned_checkpoint(tok, tmp_path, capsys):
    from pg_pruning_plugin.cli import main

    save_pruned(_heterogeneous("mistral", tok), tmp_path / "ckpt", tok)
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(out)]) == 0
    assert _fields(out)[1]["deci.attention.head_count"] == GGUF_HEADS
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2


# ---------------------------------------------------------------------------------------------- llama.cpp


def _prompts(tok):
    return [tok("The capital of France is")["input_ids"], [5, 17, 900, 33, 4000, 12]]


@needs_llama_cpp
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_llama_cpp_greedy_tokens_and_logits_match_transformers(model_type, tok, tmp_path):
    model = _heterogeneous(model_type, tok)
    path = export_gguf(model, tmp_path / "m.gguf", tok)
    for c in compare_with_llama_cpp(model, path, _prompts(tok), n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal, (c.transformers, c.llama_cpp)
        assert c.max_abs_logit_diff < 1e-4 * c.max_abs_logit + 1e-4


@needs_llama_cpp
def test_llama_cpp_uniform_llama_arch(tok, tmp_path):
    model = _tiny("llama", tok, num_hidden_layers=2, tie_word_embeddings=False)
    space = SearchSpace.from_model(model)
    masks = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units))
    masks.attn[space.attn_offsets[0]] = masks.attn[space.attn_offsets[1]] = 0
    masks.mlp[space.mlp_slice(0)][:32] = masks.mlp[space.mlp_slice(1)][:32] = 0
    prune_model(model, masks)
    path = export_gguf(model, tmp_path / "u.gguf", tok)
    assert _fields(path)[1]["general.architecture"] == "llama"
    for c in compare_with_llama_cpp(model, path, _prompts(tok), n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal and c.max_abs_logit_diff < 1e-4 * c.max_abs_logit + 1e-4


@needs_llama_cpp
def test_cli_verify(tok, tmp_path, capsys):
    from pg_pruning_plugin.cli import main

    save_pruned(_heterogeneous("qwen2", tok), tmp_path / "ckpt", tok)
    argv = ["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--verify", "--verify-tokens", "8"]
    assert main(argv) == 0
    assert "greedy tokens equal: True" in capsys.readouterr().out


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
    prune_model(model, UnitScores(widths.attn, widths.mlp, attn_blocks, mlp_blocks))
    path = export_gguf(model, tmp_path / "smollm2.gguf", tok)
    assert _fields(path)[1]["deci.block_count"] == 29
    for c in compare_with_llama_cpp(model, path, _prompts(tok)[:1], n_predict=16, runtime=RUNTIME):
        assert c.tokens_equal, (c.transformers, c.llama_cpp)
        assert c.max_abs_logit_diff < 1e-3
