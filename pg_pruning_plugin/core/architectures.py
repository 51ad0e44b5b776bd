"""Search space: which units of a decoder-only LM are prunable, and where they live.

All architecture knowledge sits in :data:`ARCHITECTURES`. Every supported family has the same
module layout (``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``);
families only differ in details that removal of whole KV groups and MLP channels leaves alone
(q/k/v biases, per-head q/k norms, head_dim != hidden/heads, soft-capping, sliding windows).

Units per decoder layer (method.md §2.1):
  * attention unit = one KV group: one key/value head plus the ``n_rep`` query heads reading it
    (plain multi-head attention is ``n_rep == 1``);
  * MLP unit = one intermediate channel (a gate/up row and the matching down column);
  * with depth granularity, also the whole attention block and the whole MLP block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = [
    "ARCHITECTURES",
    "PROJECTION_ROLES",
    "ArchitectureSpec",
    "LayerShape",
    "Projection",
    "SearchSpace",
    "UnsupportedArchitectureError",
    "architecture_of",
    "count_parameters",
    "decoder_layers",
    "projections",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Declarative description of one model family (module names are relative to a decoder layer)."""

    families: str
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    mlp_norm: str = "post_attention_layernorm"  # the norm whose input is the residual stream between the blocks

    def block_of(self, role: str) -> str:
        """The attribute of a decoder layer holding projection ``role`` (``spec.attention`` or ``spec.mlp``)."""
        return self.attention if role in ("q", "k", "v", "o") else self.mlp


_LLAMA_LAYOUT = ArchitectureSpec("Llama 1/2/3, Vicuna")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": ArchitectureSpec("Mistral"),
    "qwen2": ArchitectureSpec("Qwen2/2.5 (q/k/v biases)"),
    "qwen3": ArchitectureSpec("Qwen3 (per-head q/k norms)"),
    "gemma": ArchitectureSpec("Gemma 1"),
    "gemma2": ArchitectureSpec("Gemma 2 (soft-capping, sliding windows)", mlp_norm="pre_feedforward_layernorm"),
    "gemma3_text": ArchitectureSpec("Gemma 3 text (q/k norms, sliding windows)", mlp_norm="pre_feedforward_layernorm"),
}


class UnsupportedArchitectureError(ValueError):
    """Raised before any work when a model's ``model_type`` is not in :data:`ARCHITECTURES`."""


def _supported_list() -> str:
    return ", ".join(f"{k} ({v.families})" for k, v in ARCHITECTURES.items())


def architecture_of(config_or_model) -> ArchitectureSpec:
    """The spec for a model or config; raises :class:`UnsupportedArchitectureError` otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported. Supported: {_supported_list()}."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (or its base model)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `model.layers`; supported: {_supported_list()}."
        )
    return layers


# The seven prunable projections of a decoder layer, in layer order.
PROJECTION_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Projection:
    """One prunable projection of a model: its decoder layer, role (q/k/v/o/gate/up/down) and module."""

    layer: int
    role: str
    name: str  # relative to the base model, e.g. "layers.3.self_attn.q_proj"
    linear: nn.Linear


def projections(model: nn.Module) -> Iterator[Projection]:
    """Every prunable projection of ``model``, layer by layer in :data:`PROJECTION_ROLES` order
    (blocks that were removed have none)."""
    spec = architecture_of(model)
    for i, layer in enumerate(decoder_layers(model)):
        for role in PROJECTION_ROLES:
            block = spec.block_of(role)
            linear = getattr(getattr(layer, block), getattr(spec, role), None)
            if linear is not None:
                yield Projection(i, role, f"layers.{i}.{block}.{getattr(spec, role)}", linear)


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class LayerShape:
    """Prunable widths of one decoder layer as it currently is (0 units: the block was removed)."""

    num_kv_groups: int  # n_kv: attention units
    queries_per_group: int  # n_rep
    head_dim: int  # d
    intermediate_size: int  # I: MLP units

    @property
    def num_attention_heads(self) -> int:
        return self.num_kv_groups * self.queries_per_group


@dataclass
class SearchSpace:
    """Units of every decoder layer, flattened per unit type in layer order.

    ``attn_offsets[l] : attn_offsets[l+1]`` indexes layer l's KV groups in a flat attention
    vector; the same holds for MLP channels with ``mlp_offsets``. ``fixed_parameters`` counts the
    parameters no unit owns (embeddings, norms, ``lm_head``, q/k/v biases), when read from a model.
    """

    spec: ArchitectureSpec
    layers: list[LayerShape]
    hidden_size: int
    model_type: str
    fixed_parameters: int | None = None
    attn_offsets: list[int] = field(init=False)
    mlp_offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.attn_offsets = [0]
        self.mlp_offsets = [0]
        for shape in self.layers:
            self.attn_offsets.append(self.attn_offsets[-1] + shape.num_kv_groups)
            self.mlp_offsets.append(self.mlp_offsets[-1] + shape.intermediate_size)

    @classmethod
    def from_model(cls, model: nn.Module) -> SearchSpace:
        """Read the current (possibly already pruned) widths from the modules themselves."""
        spec = architecture_of(model)
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shapes = []
        for layer in decoder_layers(model):
            attn = getattr(layer, spec.attention)
            gate = getattr(getattr(layer, spec.mlp), spec.gate, None)
            intermediate = 0 if gate is None else gate.out_features  # no gate_proj: the MLP block was removed
            if getattr(attn, spec.q, None) is None:  # the attention block was removed
                shapes.append(LayerShape(0, 0, head_dim, intermediate))
                continue
            n_q = getattr(attn, spec.q).out_features // head_dim
            n_kv = getattr(attn, spec.k).out_features // head_dim
            if n_kv == 0 or n_q % n_kv:
                raise ValueError(f"layer has {n_q} query heads and {n_kv} KV heads; expected a multiple")
            shapes.append(LayerShape(n_kv, n_q // n_kv, head_dim, intermediate))
        space = cls(spec, shapes, config.hidden_size, config.model_type)
        space.fixed_parameters = count_parameters(model) - space.prunable_parameters()
        return space

    def with_layers(self, layers: list[LayerShape]) -> SearchSpace:
        """The same model with other layer widths (``fixed_parameters`` carried over)."""
        return SearchSpace(self.spec, layers, self.hidden_size, self.model_type, self.fixed_parameters)

    @property
    def has_removed_blocks(self) -> bool:
        return any(s.num_kv_groups == 0 or s.intermediate_size == 0 for s in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_attn_units(self) -> int:
        return self.attn_offsets[-1]

    @property
    def num_mlp_units(self) -> int:
        return self.mlp_offsets[-1]

    def attn_slice(self, layer: int) -> slice:
        return slice(self.attn_offsets[layer], self.attn_offsets[layer + 1])

    def mlp_slice(self, layer: int) -> slice:
        return slice(self.mlp_offsets[layer], self.mlp_offsets[layer + 1])

    def params_per_attn_unit(self, layer: int) -> int:
        """q/k/v rows and o columns of one KV group: ``H·d·(2·n_rep + 2)`` (biases ignored)."""
        s = self.layers[layer]
        return self.hidden_size * s.head_dim * (2 * s.queries_per_group + 2)

    def params_per_mlp_unit(self) -> int:
        """gate/up rows and the down column of one channel: ``3·H``."""
        return 3 * self.hidden_size

    def flops_per_attn_unit(self, layer: int, seq_len: int) -> int:
        """Forward FLOPs per token of one KV group at context ``seq_len``: its projections
        (2 per weight) plus scores and weighted values of its ``n_rep`` heads, ``2·n_rep·d·(T+1)``
        (each of the two products costs ``2·d`` per attended position, ``(T+1)/2`` on average under
        the causal mask)."""
        s = self.layers[layer]
        return 2 * self.params_per_attn_unit(layer) + 2 * s.queries_per_group * s.head_dim * (seq_len + 1)

    def flops_per_mlp_unit(self) -> int:
        """Forward FLOPs per token of one MLP channel: ``2·3·H``."""
        return 2 * self.params_per_mlp_unit()

    def prunable_parameters(self) -> int:
        """Weights of q/k/v/o/gate/up/down only (method.md §8 accounting)."""
        attn = sum(self.params_per_attn_unit(i) * s.num_kv_groups for i, s in enumerate(self.layers))
        return attn + self.params_per_mlp_unit() * self.num_mlp_units
