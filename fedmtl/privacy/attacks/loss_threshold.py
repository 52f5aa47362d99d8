"""The loss-threshold attack (Yeom et al. 2018): members tend to have a lower loss."""

from __future__ import annotations

import numpy as np

from fedmtl.privacy.attacks.scoring import AttackResult, _as_finite_1d, evaluate_scores


def loss_threshold_attack(
    member_losses: np.ndarray, nonmember_losses: np.ndarray, name: str = "loss_threshold"
) -> AttackResult:
    """Yeom et al.'s attack: score = −loss, so a lower loss reads as "member"."""
    members = _as_finite_1d(member_losses, "member_losses")
    nonmembers = _as_finite_1d(nonmember_losses, "nonmember_losses")
    scores = -np.concatenate([members, nonmembers])
    mask = np.concatenate([np.ones(members.size, bool), np.zeros(nonmembers.size, bool)])
    return evaluate_scores(scores, mask, name)
