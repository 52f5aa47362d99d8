"""Approximate leave-one-out (ALO) losses of a linear head fitted by penalised maximum likelihood.

For a head ψ = argmin_ψ Σ_i ℓ(y_i, η_i) + λ/2·‖ψ − φ‖² with η_i = X_i ψ (C outputs), leaving row
i out moves the fit by one Newton step, ψ_{−i} ≈ ψ + H_{−i}⁻¹ X_iᵀ g_i, where g_i = ∂ℓ/∂η_i,
W_i = ∂²ℓ/∂η_i², H = Σ_j X_jᵀ W_j X_j + λI and H_{−i} = H − X_iᵀ W_i X_i. With
A_i = X_i H⁻¹ X_iᵀ (C × C) and Woodbury's identity, the left-out prediction is

    η_{−i} = η_i + (I − A_i W_i)⁻¹ A_i g_i

(Rad & Maleki 2020, "A scalable estimate of the out-of-sample prediction error via approximate
leave-one-out", JRSS B; the same step as the infinitesimal jackknife). It is exact for ridge
regression, and close for logistic and multinomial regression away from separation. One fit and
one linear solve give the n left-out losses that k-fold cross-validation would need n fits for.

``scope="all"``: every weight and the bias are free (X_i = I_C ⊗ [z_i, 1]ᵀ, P = C·(d + 1)
parameters); A_i comes from the P × P Hessian, or, when n·C < P, from the n·C × n·C kernel form
X H⁻¹ Xᵀ = K (W K + λI)⁻¹ with K = X Xᵀ. ``scope="bias"``: only the bias is free (X_i = I_C).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

#: the largest system (P, or n·C when smaller) the ALO solves; larger heads keep the fixed λ
MAX_SYSTEM = 4096

Scope = Literal["all", "bias"]


def loss_derivatives(
    kind: str, eta: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the loss, its gradient g_i (n × C) and Hessian W_i (n × C × C) in the outputs η.
    Classification: cross-entropy on logits; regression: squared error (o − y)²."""
    if kind == "classification":
        p = eta.softmax(1)
        onehot = F.one_hot(y, eta.shape[1]).to(eta.dtype)
        losses = F.cross_entropy(eta, y, reduction="none")
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return losses, p - onehot, hess
    residual = eta[:, 0] - y.to(eta.dtype)
    hess = torch.full((eta.shape[0], 1, 1), 2.0, dtype=eta.dtype)
    return residual**2, 2.0 * residual[:, None], hess


def system_size(n: int, outputs: int, features: int, scope: Scope = "all") -> int:
    """The order of the linear system :func:`alo_losses` solves."""
    if scope == "bias":
        return outputs
    return min(outputs * (features + 1), n * outputs)


def alo_losses(
    z: torch.Tensor,
    eta: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    lam: float,
    scope: Scope = "all",
    rows: torch.Tensor | None = None,
) -> np.ndarray:
    """Each row's approximate leave-one-out loss for a head fitted at (near) the optimum of
    Σ_i ℓ_i + λ/2·‖ψ − φ‖² on features ``z`` (n × d) with outputs ``eta`` (n × C); ``rows``
    (indices): only those rows' (the Hessian still sums every row). Computed in float64.
    ``lam`` must be > 0."""
    if lam <= 0:
        raise ValueError(f"the ALO needs a prior precision > 0, got {lam}")
    z, eta = z.to(torch.float64), eta.detach().to(torch.float64)
    n, c = eta.shape
    losses, g, w = loss_derivatives(kind, eta, y)
    picked = rows is None  # whether a, eta, g, w and y are down to ``rows`` yet
    if scope == "bias":
        h = w.sum(0) + lam * torch.eye(c, dtype=torch.float64)
        a = torch.linalg.inv(h).expand(n, c, c)
    else:
        x = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
        d = x.shape[1]
        if c * d <= n * c:  # the P × P Hessian, one symmetric block pair at a time
            hess = torch.empty(c, d, c, d, dtype=torch.float64)
            for i in range(c):
                for j in range(i, c):
                    block = (x * w[:, i, j, None]).T @ x
                    hess[i, :, j, :] = block
                    hess[j, :, i, :] = block.T
            hess = hess.reshape(c * d, c * d) + lam * torch.eye(c * d, dtype=torch.float64)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(hess)).reshape(c, d, c, d)
            if not picked:
                x, eta, g, w, y = x[rows], eta[rows], g[rows], w[rows], y[rows]
                picked = True
            a = torch.einsum("ia,cadb,ib->icd", x, inv, x)
        else:  # the n·C × n·C kernel form: X H⁻¹ Xᵀ = K (W K + λI)⁻¹
            k = x @ x.T
            big_k = torch.einsum("ij,cd->icjd", k, torch.eye(c, dtype=torch.float64))
            big_w = torch.zeros(n, c, n, c, dtype=torch.float64)
            every = torch.arange(n)
            big_w[every, :, every, :] = w
            big_k, big_w = big_k.reshape(n * c, n * c), big_w.reshape(n * c, n * c)
            full = big_k @ torch.linalg.inv(
                big_w @ big_k + lam * torch.eye(n * c, dtype=torch.float64)
            )
            a = full.reshape(n, c, n, c)[every, :, every, :]
    if not picked:
        a, eta, g, w, y = a[rows], eta[rows], g[rows], w[rows], y[rows]
    shift = torch.linalg.solve(torch.eye(c, dtype=torch.float64) - a @ w, a @ g[:, :, None])
    left_out = eta + shift[:, :, 0]
    if kind == "classification":
        return F.cross_entropy(left_out, y, reduction="none").numpy()
    return ((left_out[:, 0] - y.to(torch.float64)) ** 2).numpy()
