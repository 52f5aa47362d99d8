"""A round's local training at the sites, on the one round loop (:mod:`fedmtl.rounds`).

The coordinator runs :func:`fedmtl.rounds.run` with :class:`SiteSteps`: dispatch, the group
aggregate, the global merge are its own, as in simulation; only ``local_train`` differs. It seals
the round's global state into the exchange store, starts each sampled site's training through a
:class:`Launcher` (in process for tests and benchmarks; a Prefect work pool per site in the
shell, to come), waits for them until the round's deadline, and opens each site's sealed update:
a site that is late or failed is named and dropped (it never hangs the round), an update that is
tampered, replayed or sent in another site's name is refused, naming the site.

At the site, :class:`SiteSession` does the other half: it opens the global state only if the
coordinator signed it for this run and round, trains its own client with the same
:meth:`fedmtl.federation.Federation.client_round` the simulation runs (so the model is the same
for the same partitions and seeds), keeps its personal state in its own store, and seals what
the method releases.

Not built yet (issue 18): evaluation at the sites (run the loop with ``evaluate_every=0``), the
Prefect launcher and the ``fedmtl site`` commands, secure aggregation across site processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedmtl.federation import Federation
from fedmtl.rounds import Steps
from fedmtl.server.screening import check_update
from fedmtl.sites.envelope import EnvelopeRefused, open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.wire import decode_state, decode_update, encode_state, encode_update
from fedmtl.state import ClientFailure, ClientUpdate, FailureKind, ServerState


class SiteLate(TimeoutError):
    """A site that did not deliver its update by the round's deadline."""

    failure_kind = "timeout"


@dataclass
class SiteSession:
    """What one site holds: its identity, the coordinator's public key, the exchange store, and
    its own federation (its partition, its store of personal state) with its one client."""

    identity: Identity
    known: KnownParties  # the coordinator's key, at least
    exchange: Exchange
    fed: Federation
    client: str

    def train(self, round_: int) -> int:
        """Local training for round ``round_`` (1-based): the coordinator's sealed state in, the
        sealed update out; returns the bytes written."""
        run = self.exchange.run
        blob = self.exchange.get(self.exchange.global_state(round_))
        if blob is None:
            raise FileNotFoundError(f"site '{self.client}': no global state for round {round_} yet")
        payload = open_envelope(
            blob, self.known, sender=COORDINATOR, run=run, round_=round_, kind="global-state"
        )
        state = decode_state(payload)
        update = self.fed.client_round(self.client, state)
        sealed = seal(encode_update(update), self.identity, run=run, round_=round_, kind="update")
        return self.exchange.put(self.exchange.update(round_, self.client), sealed)


class Launcher(Protocol):
    """Starts a site's local training for a round and waits for it."""

    def launch(self, site: str, round_: int) -> Any: ...

    def wait(self, handle: Any, timeout: float) -> None:
        """Returns when the site is done; raises its error, or ``TimeoutError`` at ``timeout``."""
        ...


@dataclass
class InProcessLauncher:
    """Each site's :meth:`SiteSession.train` on a thread of this process (tests, benchmarks)."""

    sessions: dict[str, SiteSession]
    workers: int = 4
    _pool: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="site")

    def launch(self, site: str, round_: int) -> Future:
        return self._pool.submit(self.sessions[site].train, round_)

    def wait(self, handle: Future, timeout: float) -> None:
        try:
            handle.result(timeout=timeout)
        except FutureTimeout:
            raise TimeoutError from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SiteSteps(Steps):
    """The round's steps with local training at the sites (module docs). ``deadline``: the
    seconds a round waits for the sites it sampled, from when it starts them."""

    exchange: Exchange
    coordinator: Identity
    known: KnownParties  # every site's public key
    launcher: Launcher
    deadline: float = 600.0
    #: bytes through the exchange store per site, last round: (global state, its update)
    traffic: dict[str, tuple[int, int]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def local_train(
        self, fed: Federation, state: ServerState, chosen: list[str]
    ) -> tuple[list[ClientUpdate], dict[str, ClientFailure], int]:
        round_, run = state.round + 1, self.exchange.run
        sent = self.exchange.put(
            self.exchange.global_state(round_),
            seal(
                encode_state(state), self.coordinator, run=run, round_=round_, kind="global-state"
            ),
        )
        handles = {site: self.launcher.launch(site, round_) for site in chosen}
        end = self.clock() + self.deadline
        failed: dict[str, ClientFailure] = {}
        by_site: dict[str, ClientUpdate] = {}
        self.traffic = {}
        for site, handle in handles.items():
            try:
                self.launcher.wait(handle, max(0.0, end - self.clock()))
            except TimeoutError:
                failed[site] = ClientFailure.of(
                    SiteLate(
                        f"site '{site}': no update by the round's deadline "
                        f"({self.deadline:g} s); dropped"
                    )
                )
                continue
            except Exception as exc:  # noqa: BLE001 - the site's own error, named in the report
                failed[site] = ClientFailure.of(exc)
                continue
            try:
                update, size = self._receive(site, round_, state)
            except Exception as exc:  # noqa: BLE001 - refused (tampered, replayed, unreadable): named
                message = str(exc) if f"site '{site}'" in str(exc) else f"site '{site}': {exc}"
                failed[site] = ClientFailure(FailureKind.REJECTED, type(exc).__name__, message)
                continue
            by_site[site] = update
            self.traffic[site] = (sent, size)
        return [by_site[s] for s in chosen if s in by_site], failed, 0

    def _receive(self, site: str, round_: int, state: ServerState) -> tuple[ClientUpdate, int]:
        blob = self.exchange.get(self.exchange.update(round_, site))
        if blob is None:
            raise EnvelopeRefused(
                site, f"site '{site}': finished but left no update for round {round_}"
            )
        payload = open_envelope(
            blob, self.known, sender=site, run=self.exchange.run, round_=round_, kind="update"
        )
        update = decode_update(payload)
        if update.client != site:
            raise EnvelopeRefused(
                site, f"site '{site}': its update names another client, '{update.client}'"
            )
        check_update(update, state)
        return update, len(blob)
