"""GGUF export for llama.cpp (docs/serving.md): metadata, tensors, tokenizer, refusals."""

import json

import gguf
import numpy as np
import pytest
import torch

from pg_pruning_plugin.export import export_gguf, permute_for_llama_cpp_rope
from tests.helpers import (
    GGUF_FF,
    GGUF_HEADS,
    GGUF_KV,
    TRUE_WIDTHS,
    gguf_fields,
    gguf_model,
    heterogeneous_gguf_model,
    tiny_model,
)


def test_permutation_interleaves_the_two_halves_of_each_head():
    rows = torch.arange(16.0)  # two heads of 8
    assert permute_for_llama_cpp_rope(rows, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    with pytest.raises(ValueError, match="whole heads"):
        permute_for_llama_cpp_rope(torch.zeros(12, 3), 8)


def test_heterogeneous_widths_and_removed_blocks_as_per_layer_arrays(tok, tmp_path):
    model = heterogeneous_gguf_model("llama", tok)
    path = export_gguf(model, tmp_path / "m.gguf", tok)
    reader, kv = gguf_fields(path)
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
    model = gguf_model("llama", tok, num_hidden_layers=2, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "u.gguf", tok, dtype="f16")
    reader, kv = gguf_fields(path)
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv["llama.attention.head_count"] == 8 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.feed_forward_length"] == 96
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.F16


def test_qwen2_biases_are_permuted_like_their_rows(tok, tmp_path):
    model = heterogeneous_gguf_model("qwen2", tok)
    reader, _ = gguf_fields(export_gguf(model, tmp_path / "q.gguf", tok))
    tensors = {t.name: t for t in reader.tensors}
    attn = model.model.layers[1].self_attn
    np.testing.assert_array_equal(tensors["blk.1.attn_q.bias"].data, permute_for_llama_cpp_rope(attn.q_proj.bias, 16))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.bias"].data, attn.v_proj.bias.numpy())


def test_tokenizer_built_from_hf_matches_the_smollm2_gguf(tok, tmp_path):
    model = gguf_model("llama", tok, num_hidden_layers=1)
    _, copied = gguf_fields(export_gguf(model, tmp_path / "copied.gguf", tok))
    _, built = gguf_fields(export_gguf(model, tmp_path / "built.gguf", tok, tokenizer_pre="smollm"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token"):
        assert built[key] == copied[key], key


def test_refusals(tok, tmp_path):
    model = gguf_model("llama", tok, num_hidden_layers=1)
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
