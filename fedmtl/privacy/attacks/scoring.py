"""Scoring a membership-inference attack: its scores against the true membership, summarised
as an :class:`AttackResult` (AUC, advantage, TPR at low FPR)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members (see the package docstring,
    :mod:`fedmtl.privacy.attacks`)."""

    auc: float
    advantage: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    n_members: int
    n_nonmembers: int
    name: str


def _as_finite_1d(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_mask(members_mask: np.ndarray, n: int) -> np.ndarray:
    mask = np.asarray(members_mask)
    if mask.ndim != 1 or mask.shape[0] != n:
        raise ValueError(f"members_mask must have shape ({n},), got {mask.shape}")
    if mask.dtype != np.bool_:
        if not np.all(np.isin(mask, (0, 1))):
            raise ValueError("members_mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("members_mask has no members: need at least one member and one non-member")
    if mask.all():
        raise ValueError(
            "members_mask has no non-members: need at least one member and one non-member"
        )
    return mask


def tpr_at_fpr(scores: np.ndarray, members_mask: np.ndarray, max_fpr: float) -> float:
    """The largest TPR of a threshold on ``scores`` whose FPR is ≤ ``max_fpr`` (0 if none)."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    scores = _as_finite_1d(scores, "scores")
    mask = _as_mask(members_mask, scores.shape[0])
    fpr, tpr, _ = roc_curve(mask, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def evaluate_scores(scores: np.ndarray, members_mask: np.ndarray, name: str) -> AttackResult:
    """Summarise attack ``scores`` (larger = more likely a member) against the true membership."""
    scores = _as_finite_1d(scores, "scores")
    mask = _as_mask(members_mask, scores.shape[0])
    fpr, tpr, _ = roc_curve(mask, scores, drop_intermediate=False)
    return AttackResult(
        auc=float(roc_auc_score(mask, scores)),
        advantage=float(np.max(tpr - fpr)),
        tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max()),
        tpr_at_01pct_fpr=float(tpr[fpr <= 0.001].max()),
        n_members=int(mask.sum()),
        n_nonmembers=int((~mask).sum()),
        name=name,
    )
