"""Least-squares reconstruction of a linear layer on a subset of its input channels.

For ``Y = W X`` (``W``: ``[out, n]``, ``X``: ``[n, tokens]``) and the kept input channels ``k``, the
weights that best reproduce ``Y`` from ``X_k`` alone are

    W'_k = argmin_V ‖W X − V X_k‖²  =  W H[:, k] (H_kk + λI)⁻¹,      H = X Xᵀ,

with the damping ``λ = damping · mean(diag H_kk)`` (a ridge term that keeps the solve well posed
when channels are nearly collinear or tokens are few). The solve is a Cholesky factorisation in
float64; if it fails, ``λ`` grows tenfold up to three times before the problem is reported as
singular. The relative reconstruction error ``‖W X − V X_k‖² / ‖W X‖²`` of any ``V`` follows from
the same statistics, without the activations.
"""

from __future__ import annotations

import torch

__all__ = ["SingularSystemError", "lstsq_weights", "relative_error"]


class SingularSystemError(RuntimeError):
    """``H_kk + λI`` stayed singular with the largest damping tried."""


def lstsq_weights(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = 0.01,
                  cross: torch.Tensor | None = None, retries: int = 3,
                  projected: torch.Tensor | None = None) -> torch.Tensor:
    """``W C[:, k] (H_kk + λI)⁻¹`` in float64: ``[out, |k|]`` (see the module docstring).

    ``weight``: ``[out, n]``; ``gram``: ``H = Σ x xᵀ``, ``[n, n]``; ``kept``: ``[|k|]`` column indices;
    ``cross``: ``C = Σ x_ref xᵀ`` when the target is ``W x_ref`` rather than ``W x`` (default: ``C = H``);
    ``projected``: ``W C`` (``[out, n]``, float64) when several kept sets of one projection are fitted.
    """
    w = weight.detach().to(gram.device, torch.float64)
    h_kk = gram[kept][:, kept]  # [k, k]
    rhs = w @ (gram if cross is None else cross)[:, kept] if projected is None else projected[:, kept]  # [out, k]
    scale = float(h_kk.diagonal().mean())
    if not scale > 0:  # the kept channels carry no signal: nothing to reconstruct from
        return w[:, kept]
    eye = torch.eye(h_kk.shape[0], dtype=torch.float64, device=gram.device)
    lam = damping * scale
    for _ in range(retries + 1):
        factor, info = torch.linalg.cholesky_ex(h_kk + lam * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, factor).T
        lam *= 10.0
    raise SingularSystemError(
        f"H_kk + λI is singular even with λ = {lam / 10:.3g} ({damping:g}·mean diag · 10^{retries})")


def relative_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, new: torch.Tensor,
                   cross: torch.Tensor | None = None, reference_gram: torch.Tensor | None = None) -> float:
    """``‖W X_ref − V X_k‖² / ‖W X_ref‖²`` from the statistics (``X_ref = X`` unless ``cross`` and
    ``reference_gram`` = ``Σ x_ref x_refᵀ`` are given):
    ``(tr(W R Wᵀ) − 2 tr(W C_:k Vᵀ) + tr(V H_kk Vᵀ)) / tr(W R Wᵀ)``."""
    w = weight.detach().to(gram.device, torch.float64)
    v = new.detach().to(gram.device, torch.float64)
    reference = gram if reference_gram is None else reference_gram
    total = float(torch.einsum("oi,ij,oj->", w, reference, w))
    if total <= 0:
        return 0.0
    cross = float(torch.einsum("oi,ij,oj->", w, (gram if cross is None else cross)[:, kept], v))
    own = float(torch.einsum("oi,ij,oj->", v, gram[kept][:, kept], v))
    return max(0.0, (total - 2 * cross + own) / total)
