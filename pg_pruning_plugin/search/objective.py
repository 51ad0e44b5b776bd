"""What a sampled sub-network is scored by: next-token cross-entropy, or KL to the dense model.

``loss="kl"`` compares the candidate's next-token distribution with the dense model's on the same
tokens, ``KL(p_dense ‖ p_candidate)``, which measures how far pruning moved the model rather than how
hard the text is. The dense distribution is kept as its top ``k`` log-probabilities per position plus
one bucket for the rest of the vocabulary (computed once per calibration block by
:func:`dense_targets`, ``[B, T-1, k]`` values and indices), so the KL needs no second forward pass:

    KL ≈ Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)

which is exact when the dense model puts all its mass on its top ``k`` tokens and a lower bound
otherwise (grouping the tail can only lose divergence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.modeling import IGNORE_INDEX, next_token_losses

__all__ = ["LOSSES", "DenseTargets", "dense_targets", "sequence_losses"]

LOSSES = ("ce", "kl")


@dataclass
class DenseTargets:
    """The dense model's top-``k`` next-token log-probabilities of one batch: ``[B, T-1, k]`` each."""

    log_probs: torch.Tensor
    indices: torch.Tensor


@torch.no_grad()
def dense_targets(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], top_k: int = 64) -> list[DenseTargets]:
    """:class:`DenseTargets` of every batch under the (unmasked) ``model``, kept on the CPU."""
    out = []
    device = next(model.parameters()).device
    for batch in batches:
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits[:, :-1]
        values, indices = torch.stack([F.log_softmax(row.float(), -1) for row in logits]).topk(top_k, dim=-1)
        out.append(DenseTargets(values.cpu(), indices.cpu()))
    return out


def _kl(logits: torch.Tensor, target: DenseTargets) -> torch.Tensor:
    """``[B, T-1]`` top-k-plus-tail KL of the rows of ``logits`` ``[B, T, V]`` from the dense targets."""
    rows = []
    for i in range(logits.shape[0]):  # one sequence at a time: no log-softmax of all B·T·V logits at once
        log_q = F.log_softmax(logits[i, :-1].float(), -1)  # [T-1, V]
        p_log = target.log_probs[i].to(log_q.device)
        q_log = log_q.gather(-1, target.indices[i].to(log_q.device))  # [T-1, k]
        p_rest = (1 - p_log.exp().sum(-1)).clamp_min(1e-12)
        q_rest = (1 - q_log.exp().sum(-1)).clamp_min(1e-12)
        rows.append((p_log.exp() * (p_log - q_log)).sum(-1) + p_rest * (p_rest.log() - q_rest.log()))
    return torch.stack(rows)


def sequence_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: str = "ce",
                    target: DenseTargets | None = None) -> torch.Tensor:
    """Mean loss of each sequence of ``batch`` (``[B]``): cross-entropy, or KL to ``target`` (``loss="kl"``).
    Padding (``attention_mask == 0``) is not scored."""
    ids = batch["input_ids"].to(logits.device)
    mask = batch.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask.to(ids.device) == 0, IGNORE_INDEX)
    if loss == "ce":
        per_token = next_token_losses(logits, labels)
    elif loss == "kl":
        if target is None:
            raise ValueError("loss='kl' needs the dense model's targets (search.objective.dense_targets)")
        per_token = _kl(logits, target) * (labels[:, 1:] != IGNORE_INDEX)
    else:
        raise ValueError(f"loss={loss!r}; choose one of {', '.join(LOSSES)}")
    valid = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return per_token.sum(1) / valid.clamp_min(1)
