"""Sample-level DP as a wrapper around a client's local training (``privacy.dp_sgd.enabled``).

:class:`SampleLevelDP` is the privacy stage the federation puts around the plain client round
(:meth:`fedmtl.federation.Federation.client_round`), as Opacus' ``PrivacyEngine`` wraps a
training loop: :meth:`~SampleLevelDP.begin` checks the client's budget and hands the round a
:class:`~fedmtl.privacy.dpsgd.DPSGDSession` (every SGD step becomes a DP-SGD step, noise and batches
from the run's secret key); :meth:`~SampleLevelDP.end` writes the round's steps to the client's
ledger and reports its ε with the update. At the server, :meth:`~SampleLevelDP.record` keeps every
client's latest ε in :attr:`fedmtl.state.ServerState.privacy` (:data:`EPSILON_KEY`).

Each client's ε is a :class:`SampleLevelAccountant` over its :class:`Ledger` (one row
(round, σ, q, steps) per round it trained, in its own store, versioned by round so that a resume
reads exactly the ledger of its checkpoint): the :class:`fedmtl.privacy.accountant.Accountant`
interface, as the run's client-level accountant is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedmtl.config.privacy import DPSGDConfig
from fedmtl.privacy.accountant import within_budget
from fedmtl.privacy.dpsgd import DPSGDSession, compact, epsilon, require_opacus
from fedmtl.privacy.randomness import SecretRandom

#: where the server keeps every client's latest reported ε (float64, manifest order, NaN: not yet)
EPSILON_KEY = "privacy/dp_sgd_epsilon"
#: the name of the ledger record in each client's store
LEDGER = "dp_sgd"


class DPSGDBudgetSpent(RuntimeError):
    """A client whose next round would take its sample-level ε above the target: it sits out."""

    failure_kind = "budget_spent"


class Ledger:
    """A client's DP-SGD steps, one row (round, σ, q, steps) per round it trained in."""

    def __init__(self, rows: Sequence[tuple[int, float, float, int]] = ()) -> None:
        self.rows = [(int(r), float(z), float(q), int(s)) for r, z, q, s in rows]

    @classmethod
    def from_tensor(cls, value: torch.Tensor | None) -> "Ledger":
        if value is None:
            return cls()
        if value.dim() != 2 or value.shape[1] != 4:
            raise ValueError(f"a DP-SGD ledger is a [k, 4] tensor, got shape {tuple(value.shape)}")
        return cls([tuple(row) for row in value.tolist()])

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.float64).reshape(-1, 4)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(z, q, s) for _, z, q, s in self.rows]

    def last_round(self) -> list[tuple[float, float, int]]:
        """The steps of the last round the client trained in (its next round's, repeated)."""
        if not self.rows:
            return []
        last = self.rows[-1][0]
        return [(z, q, s) for r, z, q, s in self.rows if r == last]

    def plus(self, round_: int, steps: Sequence[tuple[float, float, int]]) -> "Ledger":
        return Ledger(self.rows + [(round_, z, q, s) for z, q, s in compact(steps)])


@dataclass(frozen=True)
class SampleLevelAccountant:
    """One client's sample-level ε at ``delta`` over its ledger, by Opacus' ``accountant``
    (``rdp`` or ``prv``): an :class:`fedmtl.privacy.accountant.Accountant`. Its next round is
    predicted from its last one (the same steps every round: they depend on n, B and the epochs
    only, never on the data)."""

    ledger: Ledger
    delta: float
    accountant: str = "rdp"

    def epsilon(self) -> float:
        return epsilon(self.ledger.history, self.delta, self.accountant)

    def epsilon_after_next(self) -> float:
        return epsilon(self.ledger.history + self.ledger.last_round(), self.delta, self.accountant)


@dataclass(frozen=True)
class SampleLevelDP:
    """DP-SGD around every client's round, and the server's table of their ε (module docs)."""

    config: DPSGDConfig
    delta: float
    secret: SecretRandom = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        require_opacus()

    @property
    def target_epsilon(self) -> float | None:
        return self.config.target_epsilon

    def accountant(self, ledger: Ledger) -> SampleLevelAccountant:
        return SampleLevelAccountant(ledger, self.delta, self.config.accountant)

    def begin(self, client: str, round_: int, ledger: Ledger) -> DPSGDSession:
        """The client's DP-SGD session for the round after ``round_``; raises
        :class:`DPSGDBudgetSpent` when repeating its last round's steps would exceed the target."""
        spent = self.accountant(ledger)
        if ledger.rows and not within_budget(spent, self.target_epsilon):
            raise self._spent(client, spent.epsilon_after_next(), "one more round")
        return DPSGDSession(
            self.config, noise=self.secret.stream("client", client, round_, "dp-sgd")
        )

    def end(
        self, client: str, round_: int, ledger: Ledger, session: DPSGDSession
    ) -> tuple[Ledger, float]:
        """The client's ledger with the round's steps, and its ε now; raises
        :class:`DPSGDBudgetSpent` (and nothing of the round is kept) above the target."""
        ledger = ledger.plus(round_ + 1, session.steps)
        eps = self.accountant(ledger).epsilon()
        if self.target_epsilon is not None and not eps <= self.target_epsilon:
            raise self._spent(client, eps, "this round")
        return ledger, eps

    def _spent(self, client: str, eps: float, when: str) -> DPSGDBudgetSpent:
        return DPSGDBudgetSpent(
            f"client '{client}': {when} would take its sample-level ε to {eps:.4g} > "
            f"privacy.dp_sgd.target_epsilon={self.target_epsilon:g} at δ={self.delta:g}; "
            "it sits the round out"
        )

    def record(
        self, table: torch.Tensor | None, client_ids: Sequence[str], reports: dict[str, float]
    ) -> torch.Tensor:
        """The server's table of every client's latest ε (``client_ids`` order, NaN for a client
        that has not trained) with this round's ``reports`` (client -> ε) written in."""
        table = (
            table.clone()
            if table is not None and table.numel() == len(client_ids)
            else torch.full((len(client_ids),), math.nan, dtype=torch.float64)
        )
        index = {c: i for i, c in enumerate(client_ids)}
        for client, eps in reports.items():
            if client in index:
                table[index[client]] = float(eps)
        return table

    def tags(self, table: torch.Tensor | None) -> dict[str, str]:
        """The run's tags: δ, and the largest and the mean client ε spent."""
        metrics = client_epsilons(table)
        out = {"privacy_dp_sgd_delta": f"{self.delta:g}"}
        for name in ("max", "mean"):
            value = metrics.get(f"privacy/dp_sgd_epsilon_{name}")
            if value is not None:
                out[f"privacy_dp_sgd_epsilon_{name}"] = f"{value:.6g}"
        return out


def client_epsilons(table: torch.Tensor | None) -> dict[str, float]:
    """``privacy/dp_sgd_epsilon_max`` and ``_mean`` over the clients that have trained (from the
    server's table of every client's latest reported ε), and how many have."""
    if table is None:
        return {}
    known = table[~torch.isnan(table)]
    if known.numel() == 0:
        return {"privacy/dp_sgd_clients": 0.0}
    return {
        "privacy/dp_sgd_epsilon_max": float(known.max()),
        "privacy/dp_sgd_epsilon_mean": float(known.mean()),
        "privacy/dp_sgd_clients": float(known.numel()),
    }
