"""The vocabulary of unit values: one value per unit (:class:`UnitValues`) and batches of masks (:class:`UnitMasks`).

A *unit* is a KV group or an MLP channel of a :class:`~pg_pruning_plugin.core.architectures.SearchSpace`,
and, when whole blocks are searched, a layer's attention block or MLP block. Keep-probabilities,
0/1 masks, importance scores and costs are all :class:`UnitValues`: four flat vectors in
search-space order. Sampled masks are :class:`UnitMasks`, the same four fields with a leading sample
dimension. The conversions between the two are lossless (block entries included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .architectures import SearchSpace

__all__ = ["BLOCK_TYPES", "UNIT_TYPES", "WIDTH_TYPES", "UnitMasks", "UnitScores", "UnitValues"]

WIDTH_TYPES = ("attn", "mlp")  # KV groups, MLP channels
BLOCK_TYPES = ("attn_blocks", "mlp_blocks")  # whole attention blocks, whole MLP blocks (one per layer)
UNIT_TYPES = WIDTH_TYPES + BLOCK_TYPES


class _PerUnitType:
    """Access shared by :class:`UnitValues` and :class:`UnitMasks`: the four tensors by type name."""

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_blocks: torch.Tensor | None
    mlp_blocks: torch.Tensor | None

    @property
    def has_blocks(self) -> bool:
        return self.attn_blocks is not None

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors by name (block entries only when present)."""
        out = {"attn": self.attn, "mlp": self.mlp}
        if self.has_blocks:
            out |= {"attn_blocks": self.attn_blocks, "mlp_blocks": self.mlp_blocks}
        return out


@dataclass
class UnitValues(_PerUnitType):
    """One value per unit, flat per type in :class:`SearchSpace` order.

    ``attn_blocks``/``mlp_blocks`` (one value per decoder layer) are present only when whole
    attention or MLP blocks are units too (depth granularity); ``None`` means every block stays.
    """

    attn: torch.Tensor  # [num_attn_units]
    mlp: torch.Tensor  # [num_mlp_units]
    attn_blocks: torch.Tensor | None = None  # [num_layers]
    mlp_blocks: torch.Tensor | None = None  # [num_layers]

    @classmethod
    def full(cls, space: SearchSpace, value: float, blocks: bool = False) -> UnitValues:
        """``value`` for every width unit (and every block, with ``blocks``)."""
        per_layer = torch.full((space.num_layers,), value) if blocks else None
        return cls(torch.full((space.num_attn_units,), value), torch.full((space.num_mlp_units,), value),
                   per_layer, None if per_layer is None else per_layer.clone())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UnitValues:
        """``fn`` applied to every present tensor."""
        return UnitValues(**{name: fn(value) for name, value in self.as_dict().items()})

    def stepped(self, updates: dict[str, torch.Tensor], lr: float) -> UnitValues:
        """``self[k] − lr · updates[k]`` for the types in ``updates``; the other types as they are."""
        return dataclasses.replace(self, **{k: getattr(self, k) - lr * u for k, u in updates.items()})

    def as_masks(self) -> UnitMasks:
        """These values as one mask sample."""
        return UnitMasks(**self.as_dict())


UnitScores = UnitValues  # the package's first name for this type, kept in its public API


@dataclass
class UnitMasks(_PerUnitType):
    """Keep masks over the flat unit vectors of a :class:`SearchSpace`, one row per sample.

    attn: ``[S, num_attn_units]``, mlp: ``[S, num_mlp_units]``; 1 keeps, 0 removes.
    A 1-D tensor is one sample.
    """

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_blocks: torch.Tensor | None = None  # [S, num_layers]: 0 removes a layer's whole attention block
    mlp_blocks: torch.Tensor | None = None  # [S, num_layers]: 0 removes a layer's whole MLP block

    def __post_init__(self) -> None:
        for name in UNIT_TYPES:
            value = getattr(self, name)
            if value is not None and value.dim() == 1:
                setattr(self, name, value.unsqueeze(0))
        if self.attn.shape[0] != self.mlp.shape[0]:
            raise ValueError("attn and mlp masks must have the same number of samples")
        if (self.attn_blocks is None) != (self.mlp_blocks is None):
            raise ValueError("give both attn_blocks and mlp_blocks, or neither")

    @classmethod
    def of(cls, masks: UnitMasks | UnitValues) -> UnitMasks:
        """``masks`` as :class:`UnitMasks` (a :class:`UnitValues` is one sample)."""
        return masks if isinstance(masks, UnitMasks) else masks.as_masks()

    @classmethod
    def ones(cls, space: SearchSpace, num_samples: int = 1) -> UnitMasks:
        return cls(torch.ones(num_samples, space.num_attn_units), torch.ones(num_samples, space.num_mlp_units))

    @property
    def num_samples(self) -> int:
        return self.attn.shape[0]

    def sample(self, j: int) -> UnitValues:
        """Sample ``j`` as :class:`UnitValues` (block entries included)."""
        return UnitValues(**{name: value[j] for name, value in self.as_dict().items()})

    def folded(self, space: SearchSpace) -> UnitMasks:
        """Width-only masks: a removed block zeroes every unit of its layer, which makes it an
        identity on the residual stream (its output projection has no bias in any supported family)."""
        if not self.has_blocks:
            return self
        attn_per_unit = torch.repeat_interleave(
            self.attn_blocks, torch.tensor([s.num_kv_groups for s in space.layers]), dim=1)
        mlp_per_unit = torch.repeat_interleave(
            self.mlp_blocks, torch.tensor([s.intermediate_size for s in space.layers]), dim=1)
        return UnitMasks(self.attn * attn_per_unit, self.mlp * mlp_per_unit)
