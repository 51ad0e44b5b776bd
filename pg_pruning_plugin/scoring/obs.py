"""Refit-aware ranking of a projection's input units: greedy Optimal Brain Surgeon (OBS) removal order.

For a linear map ``Y = W X`` with input statistics ``H = X Xᵀ`` (refit/statistics.py), removing a group
``G`` of input columns and re-fitting the others by least squares (refit/lstsq.py) raises the
reconstruction error ``‖W X − W' X_kept‖²`` by (Hassibi & Stork; ZipLM, SlimGPT)

    ΔE(G) = tr( W_G (H⁻¹_GG)⁻¹ W_Gᵀ ),      H⁻¹ of the still-kept columns,

so a ranking by ``ΔE`` keeps the units the refit cannot replace, not merely the large ones. The
greedy order removes the cheapest group, downdates ``W`` (the optimal compensation
``W -= W_G (H⁻¹_GG)⁻¹ H⁻¹_G,:``) and ``H⁻¹`` (the Schur complement), and repeats; the result is a
nested order: the first ``k`` units it keeps are the best ``k`` it found for every ``k``.
``group`` columns form one unit (a KV group is ``n_rep · head_dim`` columns of ``o_proj``); channels
(``group = 1``) are removed ``chunk`` at a time (the ``chunk`` lowest scores of a round): ``n / chunk``
rounds of ``O(n² · chunk)`` instead of ``n`` rounds.
"""

from __future__ import annotations

import torch

__all__ = ["obs_order"]


def _damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    n = gram.shape[0]
    lam = damping * float(gram.diagonal().mean()) or damping
    return torch.linalg.inv(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device))


@torch.no_grad()
def obs_order(weight: torch.Tensor, gram: torch.Tensor, group: int = 1, damping: float = 0.01,
              chunk: int = 32) -> torch.Tensor:
    """Units (groups of ``group`` consecutive input columns of ``weight`` ``[out, n]``) ordered from the
    most to the least important by greedy OBS removal (module docstring): ``[n // group]`` long."""
    w = weight.detach().to(gram.device, torch.float64).clone()
    n = w.shape[1]
    if n % group:
        raise ValueError(f"{n} input columns do not split into groups of {group}")
    units = n // group
    h_inv = _damped_inverse(gram.to(torch.float64), damping)
    alive = torch.ones(units, dtype=torch.bool, device=gram.device)
    removed: list[int] = []
    per_round = chunk if group == 1 else 1
    while int(alive.sum()) > 1:
        cols = torch.arange(n, device=gram.device).view(units, group)  # [units, group]
        if group == 1:
            scores = (w * w).sum(0) / h_inv.diagonal().clamp_min(1e-30)  # [n]
        else:
            scores = torch.full((units,), float("inf"), dtype=torch.float64, device=gram.device)
            for u in torch.nonzero(alive).flatten().tolist():
                idx = cols[u]
                w_g = w[:, idx]
                scores[u] = torch.trace(w_g @ torch.linalg.solve(h_inv[idx][:, idx], w_g.T))
        scores[~alive] = float("inf")
        take = min(per_round, int(alive.sum()) - 1)
        drop = torch.topk(scores, take, largest=False).indices
        drop = drop[torch.argsort(scores[drop])]
        idx = cols[drop].flatten()
        block_inv = torch.linalg.inv(h_inv[idx][:, idx])  # (H⁻¹_GG)⁻¹
        w -= w[:, idx] @ block_inv @ h_inv[idx, :]
        h_inv -= h_inv[:, idx] @ block_inv @ h_inv[idx, :]
        w[:, idx] = 0.0
        h_inv[idx, :] = 0.0
        h_inv[:, idx] = 0.0
        h_inv[idx, idx] = 1.0  # removed columns: any positive diagonal keeps later scores finite (they are inf)
        alive[drop] = False
        removed += drop.tolist()
    last = torch.nonzero(alive).flatten().tolist()
    return torch.tensor(list(reversed(removed + last)), dtype=torch.long)
