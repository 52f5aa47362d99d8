"""One accountant interface over both guarantees fedmtl gives.

- client-level DP-FedAvg, one accountant per run
  (:class:`fedmtl.privacy.accounting.PrivacyAccountant`, on Google's ``dp_accounting`` RDP
  accountant);
- sample-level DP-SGD, one accountant per client
  (:class:`fedmtl.privacy.sample_level.SampleLevelAccountant`, on Opacus' RDP or PRV accountant
  over the client's ledger of steps).

Both answer the same two questions, so a budget is checked the same way for either
(:func:`within_budget`): what has been spent, and what one more round like the last would bring
it to (training stops, or the client sits out, *before* a round that would exceed the target).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Accountant(Protocol):
    """ε at ``delta`` of one (ε, δ) guarantee."""

    delta: float

    def epsilon(self) -> float:
        """ε spent so far (0 before anything was released)."""
        ...

    def epsilon_after_next(self) -> float:
        """ε once one more round like the last one (and whatever release is planned after it)
        is spent."""
        ...


def within_budget(accountant: Accountant, target: float | None) -> bool:
    """Whether one more round keeps ``accountant`` at or below ``target`` (no target: always)."""
    return target is None or accountant.epsilon_after_next() <= target
