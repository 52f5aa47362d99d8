"""Fault injection (``faults`` settings): failures on purpose, for the tests and the reliability
benchmark. Nothing here runs unless a ``faults`` setting asks for it.

- **Failing clients** (``client_failure_rate``): each training attempt of each client raises
  :class:`InjectedFailure` with this probability, drawn from a generator seeded by the seed,
  round, client and attempt, so a retry is a new draw and a rerun the same one.
- **Stragglers** (``straggler_rate``, ``straggler_delay``): that share of a round's clients
  (seeded per round) waits ``straggler_delay`` seconds before training. With
  ``training.client_timeout`` shorter than the delay, the client is cut off once the timeout
  has passed (:class:`ClientTimeout`): the server waited that long and went on without it.
- **Byzantine clients** (``byzantine_fraction``, ``byzantine_attack``): a fixed seeded set of
  clients (:func:`fedmtl.server.byzantine.attackers`) sends corrupted updates, or trains on flipped
  labels (:mod:`fedmtl.server.byzantine`).
- **A crash** (``crash_at_round``): the process kills itself with SIGKILL mid-round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmtl.client.data import ClientData
from fedmtl.data.manifest import TaskSpec
from fedmtl.server.byzantine import DATA_ATTACKS, attackers, corrupt_update, flip_labels
from fedmtl.state import ClientUpdate


class InjectedFailure(RuntimeError):
    """A client failure made on purpose (``faults.client_failure_rate``)."""


class ClientTimeout(TimeoutError):
    """A client that did not finish within ``training.client_timeout``."""

    failure_kind = "timeout"  # it was given its time: not retried


def _uniform(*key: object) -> float:
    """A reproducible draw in [0, 1) from a key (no global random state involved)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class FaultSpec:
    client_failure_rate: float = 0.0
    straggler_rate: float = 0.0
    straggler_delay: float = 0.0
    client_timeout: float | None = None
    byzantine_fraction: float = 0.0
    byzantine_attack: str = "sign_flip"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "FaultSpec":
        f = cfg.faults
        return cls(
            f.client_failure_rate,
            f.straggler_rate,
            f.straggler_delay,
            cfg.training.client_timeout,
            f.byzantine_fraction,
            f.byzantine_attack,
            cfg.training.seed,
        )

    def before_training(self, client: str, round_: int, attempt: int = 0) -> None:
        """Run a client's injected faults before it trains: maybe wait like a straggler (cut off
        at ``client_timeout``), maybe fail."""
        if (
            self.straggler_rate
            and _uniform(self.seed, "straggler", round_, client) < self.straggler_rate
        ):
            wait = (
                self.straggler_delay
                if self.client_timeout is None
                else min(self.straggler_delay, self.client_timeout)
            )
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(
                    min(left, 0.05)
                )  # short sleeps: a task timeout can interrupt between them
            if self.client_timeout is not None and self.straggler_delay > self.client_timeout:
                raise ClientTimeout(
                    f"client '{client}' was cut off after training.client_timeout = "
                    f"{self.client_timeout:g} s (it needed {self.straggler_delay:g} s)"
                )
        if (
            self.client_failure_rate
            and _uniform(self.seed, "fail", round_, client, attempt) < self.client_failure_rate
        ):
            raise InjectedFailure(
                f"client '{client}' failed in round {round_} (attempt {attempt + 1}; injected "
                f"by faults.client_failure_rate = {self.client_failure_rate:g})"
            )

    def byzantine(self, clients: Sequence[str]) -> frozenset[str]:
        return (
            attackers(clients, self.byzantine_fraction, self.seed)
            if self.byzantine_fraction
            else frozenset()
        )

    def poison_data(
        self, data: ClientData, tasks: Sequence[TaskSpec], bad: frozenset[str]
    ) -> ClientData:
        """A Byzantine client's training data under a data attack (labels flipped; held-out rows
        untouched); anyone else's data as it is."""
        if data.client not in bad or self.byzantine_attack not in DATA_ATTACKS:
            return data
        flipped = {
            t.name: flip_labels(data.y_train[t.name], t.n_outputs)
            for t in tasks
            if t.kind == "classification"
        }
        return dataclasses.replace(data, y_train={**data.y_train, **flipped})

    def poison_update(self, update: ClientUpdate, round_: int, bad: frozenset[str]) -> ClientUpdate:
        """A Byzantine client's released update under a model attack; anyone else's as it is."""
        if update.client not in bad or self.byzantine_attack in DATA_ATTACKS:
            return update
        seed = int(_uniform(self.seed, "byzantine", round_, update.client) * 2**62)
        return corrupt_update(
            update, self.byzantine_attack, generator=torch.Generator().manual_seed(seed)
        )


def crash_if_due(crash_at_round: int | None, round_: int) -> None:
    """Kill this process with SIGKILL, as an out-of-memory killer or a lost machine would (no
    handler, no clean-up), when ``round_`` is ``faults.crash_at_round``."""
    if crash_at_round is not None and round_ == crash_at_round:
        os.kill(os.getpid(), signal.SIGKILL)
