"""Shared test helpers: tiny random-weight models of every supported architecture, unit masks and
synthetic search results, saved tiny models with a tokenizer, greedy decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from pg_pruning_plugin import SearchConfig, SearchResult, SearchSpace, UnitValues, hard_masks
from pg_pruning_plugin.export import NODE_LLAMA_CPP_ENV, NODE_LLAMA_CPP_VERSION, find_node_llama_cpp

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, vocab_size=200, max_position_embeddings=256)

# (model_type, overrides): Llama MHA and GQA, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms),
# Gemma 1, Gemma 2 (head_dim 256-style decoupled head_dim, soft-capping), Gemma 3 (sliding windows).
ARCH_CASES = [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 8}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {}),
    ("gemma2", {"head_dim": 32, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    ("gemma3_text", {"head_dim": 32, "sliding_window": 4}),
]
ARCH_IDS = [f"{t}-{i}" for i, (t, _) in enumerate(ARCH_CASES)]


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **(TINY | overrides))
    return AutoModelForCausalLM.from_config(config).eval()


def random_masks(space, keep: float = 0.6, seed: int = 1) -> UnitValues:
    """Random 0/1 masks that keep the first unit of every layer."""
    g = torch.Generator().manual_seed(seed)
    attn = (torch.rand(space.num_attn_units, generator=g) < keep).float()
    mlp = (torch.rand(space.num_mlp_units, generator=g) < keep).float()
    for i in range(space.num_layers):
        attn[space.attn_offsets[i]] = 1
        mlp[space.mlp_offsets[i]] = 1
    return UnitValues(attn, mlp)


def synthetic_result(model, global_budget: bool, seed: int = 1, attn_sparsity: float = 0.5,
                     mlp_sparsity: float = 0.3) -> SearchResult:
    """A search result whose keep-probabilities have a layer-dependent mean (so global ranking gives
    unequal layers), with the hard masks of its per-type budget."""
    space = SearchSpace.from_model(model)
    g = torch.Generator().manual_seed(seed)

    def probs(widths):
        return torch.cat([torch.sigmoid(1.5 * math.sin(1.3 * i + 0.5) + torch.randn(w, generator=g))
                          for i, w in enumerate(widths)])

    scores = UnitValues(probs([s.num_kv_groups for s in space.layers]),
                        probs([s.intermediate_size for s in space.layers]))
    config = SearchConfig(preset="authors",
                          attn_sparsity=attn_sparsity, mlp_sparsity=mlp_sparsity, global_budget=global_budget,
                          steps=1, init="constant")
    return SearchResult(scores, hard_masks(scores, space, config), space, config)


def greedy(model, ids: torch.Tensor, tokens: int = 6) -> torch.Tensor:
    """Greedy ``generate`` with the KV cache."""
    return model.generate(ids, max_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 … w{vocab_size-4}`` plus ``<unk>``, ``<s>``, ``</s>``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(vocab_size - 3)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def save_tiny(path: Path, tokenizer, **overrides) -> torch.nn.Module:
    """A tiny Llama (``overrides`` of :data:`TINY`, the tokenizer's vocabulary) saved with ``tokenizer`` at
    ``path``; returns the model."""
    model = tiny_model(**({"vocab_size": len(tokenizer)} | overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


# -- GGUF export ---------------------------------------------------------------------------------------
# 5 layers: L0 loses its attention, L2 both blocks (deleted), L3 its MLP, L4 its attention; L0/L1 lose some
# channels, L1 one of its two KV groups. Written GGUF layers: heads [1*, 4, 8, 0], KV [1*, 1, 2, 0],
# MLP [56, 95, 1*, 96] (* = zero stand-ins for llama.cpp's deci graph).
GGUF_HEADS, GGUF_KV, GGUF_FF = [1, 4, 8, 0], [1, 1, 2, 0], [56, 95, 1, 96]
TRUE_WIDTHS = [(0, 0, 56), (4, 1, 95), (8, 2, 0), (0, 0, 96)]


def gguf_model(model_type: str, tok, **overrides) -> torch.nn.Module:
    """A tiny model of ``model_type`` with ``tok``'s vocabulary, 5 layers, tied embeddings and a wide init
    (as in SmolLM2; clear argmax margins)."""
    settings = dict(vocab_size=len(tok), num_hidden_layers=5, max_position_embeddings=512, initializer_range=0.2,
                    tie_word_embeddings=True)
    return tiny_model(model_type, **(settings | overrides))


def heterogeneous_gguf_model(model_type: str, tok, **overrides) -> torch.nn.Module:
    """:func:`gguf_model` pruned to the per-layer widths and removed blocks above."""
    from pg_pruning_plugin import prune_model

    model = gguf_model(model_type, tok, **overrides)
    space = SearchSpace.from_model(model)
    masks = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.0, 1, 0, 1, 0]), torch.tensor([1.0, 1, 0, 0, 1]))
    masks.mlp[space.mlp_slice(0)][:40] = 0
    masks.mlp[space.mlp_offsets[1] + 3] = 0
    masks.attn[space.attn_offsets[1]] = 0
    return prune_model(model, masks).requires_grad_(False)


def gguf_fields(path):
    """``(reader, {key: value})`` of a GGUF file, without the ``GGUF.`` header keys."""
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


LLAMA_CPP_RUNTIME = find_node_llama_cpp()
needs_llama_cpp = pytest.mark.skipif(
    LLAMA_CPP_RUNTIME is None,
    reason=f"llama.cpp runtime not found: `npm install --prefix DIR node-llama-cpp@{NODE_LLAMA_CPP_VERSION}` and set "
           f"{NODE_LLAMA_CPP_ENV}=DIR (node >= 20 on PATH)")


# -- llmcompressor ------------------------------------------------------------------------------------
QUANT_VOCAB = 256
# hidden 128 so the W4A16 preset (group 128) applies; a KV group is 2 x 32 = 64 o_proj columns, so
# group 128 forces an even number of kept KV groups per layer.
QUANT_TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, vocab_size=QUANT_VOCAB, max_position_embeddings=256)


# The shipped recipes with the search shrunk for the tiny model and 16 calibration sequences (conftest.llmc_calib).
# Units (authors) recipes: half of the 4 KV groups go, so 4 query heads divide the hidden size as LlamaConfig
# requires, and 30 % of the MLP channels. Allocation recipes: 30 % of the prunable parameters, 4 held-in blocks.
FAST_RECIPE = {
    "authors": {"steps": 3, "batch_size": 4, "init_batches": 2, "seq_len": None, "sparsity": 0.3, "attn_sparsity": 0.5},
    "allocation": {"steps": 3, "batch_size": 4, "seq_len": None, "sparsity": 0.3, "held_in_blocks": 4,
                   "incumbent_every": 2},
}


def fast_recipe(name: str, **overrides) -> str:
    """The shipped recipe ``name`` as YAML text, its pruning modifier shrunk by :data:`FAST_RECIPE`."""
    import yaml

    recipe = yaml.safe_load((RECIPES / name).read_text())
    fields = recipe["pruning_stage"]["pruning_modifiers"]["PolicyGradientPruningModifier"]
    fields.update(FAST_RECIPE[overrides.get("preset", fields.get("preset", "allocation"))] | overrides)
    return yaml.safe_dump(recipe, sort_keys=False)

