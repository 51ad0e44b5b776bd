"""Tiny random-weight models of every supported architecture, and random unit masks."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

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


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **(TINY | overrides))
    return AutoModelForCausalLM.from_config(config).eval()


def random_masks(space, keep: float = 0.6, seed: int = 1):
    """Random 0/1 masks that keep the first unit of every layer."""
    from pg_pruning_plugin import UnitScores

    g = torch.Generator().manual_seed(seed)
    attn = (torch.rand(space.num_attn_units, generator=g) < keep).float()
    mlp = (torch.rand(space.num_mlp_units, generator=g) < keep).float()
    for i in range(space.num_layers):
        attn[space.attn_offsets[i]] = 1
        mlp[space.mlp_offsets[i]] = 1
    return UnitScores(attn, mlp)
