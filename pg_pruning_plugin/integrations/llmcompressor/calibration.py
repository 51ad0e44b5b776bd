"""The calibration data of ``oneshot`` as search batches."""

from __future__ import annotations

import torch

__all__ = ["search_batches"]


def search_batches(loader, batch_size: int, seq_len: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Cache one pass of ``loader`` as search batches of ``batch_size`` rows.

    Padding is removed row by row (``attention_mask``), rows are optionally cut into ``seq_len``-token
    blocks (a shorter tail is dropped unless it is the whole row), regrouped, and right-padded with an
    ``attention_mask``. A partial last batch is dropped when at least one full batch exists.
    """
    rows: list[torch.Tensor] = []
    for batch in loader:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for r in range(ids.shape[0]):
            tokens = ids[r] if mask is None else ids[r][mask[r].bool()]
            if seq_len and tokens.numel() > seq_len:
                tokens = tokens[: tokens.numel() // seq_len * seq_len]
                rows += list(tokens.split(seq_len))
            elif tokens.numel() >= 2:
                rows.append(tokens)
    if not rows:
        raise ValueError("the calibration data holds no sequence of at least 2 tokens")
    n = len(rows) // batch_size * batch_size or len(rows)
    batches = []
    for start in range(0, n, batch_size):
        group = rows[start:start + batch_size]
        length = max(t.numel() for t in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        attention = torch.zeros(len(group), length, dtype=torch.long)
        for j, t in enumerate(group):
            ids[j, : t.numel()] = t
            attention[j, : t.numel()] = 1
        batches.append({"input_ids": ids, "attention_mask": attention})
    return batches
