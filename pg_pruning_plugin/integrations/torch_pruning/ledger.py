"""The ledger of a pruning run: which original units of a search result are still in the model.

Torch-Pruning addresses channels by their *current* position, which shifts as iterative steps remove
units; the search result addresses them by their *original* id. :class:`UnitLedger` maps one to the
other. :func:`~pg_pruning_plugin.integrations.torch_pruning.pruner.prune_step` records every
removal in it; the importance reads it to score current positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...core.architectures import SearchSpace
from ...core.units import UnitValues

__all__ = ["ATTN", "MLP", "UnitLedger", "format_blocks"]

ATTN, MLP = "attn", "mlp"


def format_blocks(blocks: Sequence[tuple[int, str]]) -> str:
    """``"layer 0 mlp, layer 1 attn"`` for ``[(0, "mlp"), (1, "attn")]``."""
    return ", ".join(f"layer {i} {kind}" for i, kind in blocks) or "none"


class UnitLedger:
    """Original unit ids still present, per layer and type, in current channel order.

    ``space``: the search's (unpruned) space. ``removed_blocks``: ``(layer, "attn" | "mlp")`` of the
    blocks the search removed; ``with_blocks``: the result has block masks (depth granularities).
    """

    def __init__(self, space: SearchSpace, removed_blocks: Sequence[tuple[int, str]] = (), with_blocks: bool = False):
        self.space = space
        self.alive: dict[str, list[list[int]]] = {
            ATTN: [list(range(s.num_kv_groups)) for s in space.layers],
            MLP: [list(range(s.intermediate_size)) for s in space.layers],
        }
        self.removed_blocks = tuple(removed_blocks)
        self.with_blocks = with_blocks
        self.blocks_pending = bool(self.removed_blocks)  # removed blocks still in the model
        self._deleted_layers: set[int] = set()  # decoder layers that lost both blocks, once removed

    def present_layers(self) -> list[int]:
        """Original indices of the decoder layers still in the model."""
        return [i for i in range(self.space.num_layers) if i not in self._deleted_layers]

    def mark_removed(self, kind: str, layer: int, positions: Sequence[int]) -> None:
        """Drop the units at current ``positions`` of a layer."""
        gone = set(positions)
        self.alive[kind][layer] = [u for p, u in enumerate(self.alive[kind][layer]) if p not in gone]

    def mark_blocks_removed(self) -> None:
        """Record that :attr:`removed_blocks` left the model (their units are no longer present)."""
        for layer, kind in self.removed_blocks:
            self.alive[kind][layer] = []
        self._deleted_layers = {i for i in range(self.space.num_layers)
                                if (i, ATTN) in self.removed_blocks and (i, MLP) in self.removed_blocks}
        self.blocks_pending = False

    def check_widths(self, model: nn.Module) -> None:
        """Raise if ``model``'s widths no longer match the ledger (it was pruned behind the ledger's back)."""
        now = SearchSpace.from_model(model)
        present = self.present_layers()
        if len(now.layers) != len(present):
            raise ValueError(
                f"the model has {len(now.layers)} decoder layers, but this importance tracked {len(present)}: the "
                f"model was pruned outside prune_step; build a new importance for it"
            )
        for i, shape in zip(present, now.layers):
            if (shape.num_kv_groups, shape.intermediate_size) != (len(self.alive[ATTN][i]), len(self.alive[MLP][i])):
                raise ValueError(
                    f"layer {i} has {shape.num_kv_groups} KV groups and {shape.intermediate_size} channels, but this "
                    f"importance tracked {len(self.alive[ATTN][i])} and {len(self.alive[MLP][i])}: the model was "
                    f"pruned outside prune_step; build a new importance for it"
                )

    def kept_per_layer(self) -> list[tuple[int, int]]:
        """``(KV groups, MLP channels)`` present per original layer (0 for a removed block)."""
        return [(len(a), len(m)) for a, m in zip(self.alive[ATTN], self.alive[MLP])]

    def kept_masks(self) -> UnitValues:
        """0/1 masks over the original units (1 = still present), in :class:`SearchSpace` order.

        With block masks (depth granularities) the blocks are 0 once removed (their units are 0 too), 1 before.
        """
        masks = []
        for kind, n, layer_slice in ((ATTN, self.space.num_attn_units, self.space.attn_slice),
                                     (MLP, self.space.num_mlp_units, self.space.mlp_slice)):
            mask = torch.zeros(n)
            for layer, alive in enumerate(self.alive[kind]):
                mask[layer_slice(layer).start + torch.tensor(alive, dtype=torch.long)] = 1.0
            masks.append(mask)
        if not self.with_blocks:
            return UnitValues(*masks)
        gone = set() if self.blocks_pending else set(self.removed_blocks)
        blocks = [torch.tensor([0.0 if (i, kind) in gone else 1.0 for i in range(self.space.num_layers)])
                  for kind in (ATTN, MLP)]
        return UnitValues(*masks, *blocks)
