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

Evaluation runs at the sites too: each scores the global, group and personalised models on
its own held-out rows and returns its records (only when ``privacy.evaluation.client_metrics``
allows per-client figures; the pooled evaluation needs the secure sum across site processes,
not built yet, and is refused with that reason rather than done in the clear).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from fedmtl.federation import Federation
from fedmtl.privacy.aggregation import RoundPrivacy
from fedmtl.rounds import Steps
from fedmtl.server.screening import check_update
from fedmtl.sites.envelope import EnvelopeRefused, open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.secure import CoordinatorSecureSum, SiteSecureSum, stand_in
from fedmtl.sites.wire import decode_state, decode_update, encode_state, encode_update
from fedmtl.state import ClientFailure, ClientUpdate, FailureKind, GroupAggregate, ServerState

log = logging.getLogger(__name__)

#: what a site is asked to do
TASKS = ("train", "evaluate")


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
    #: seconds the site waits for each of the coordinator's SecAgg+ messages
    patience: float = 600.0

    def train(self, round_: int) -> int:
        """Local training for round ``round_`` (1-based): the coordinator's sealed state in, the
        sealed update out; returns the bytes written."""
        run, start = self.exchange.run, time.perf_counter()
        blob = self.exchange.get(self.exchange.global_state(round_))
        if blob is None:
            raise FileNotFoundError(f"site '{self.client}': no global state for round {round_} yet")
        payload = open_envelope(
            blob, self.known, sender=COORDINATOR, run=run, round_=round_, kind="global-state"
        )
        update = self.fed.client_round(self.client, decode_state(payload))
        trained = time.perf_counter() - start
        if self.fed.privacy.secure:  # the update leaves the site masked, inside the secure sum
            sent = SiteSecureSum(self, round_).take_part(update)
        else:
            sealed = seal(
                encode_update(update), self.identity, run=run, round_=round_, kind="update"
            )
            sent = self.exchange.put(self.exchange.update(round_, self.client), sealed)
        took = (self.client, round_, trained, time.perf_counter() - start)
        log.info("site '%s': round %d: trained in %.2f s, %.2f s in all", *took)
        return sent

    def evaluate(self, round_: int) -> int:
        """Scores the state after round ``round_`` on the site's held-out rows (every variant,
        its personal head fitted and kept here); the sealed records out; returns the bytes."""
        run = self.exchange.run
        blob = self.exchange.get(self.exchange.evaluation_state(round_))
        if blob is None:
            raise FileNotFoundError(
                f"site '{self.client}': no state to evaluate for round {round_} yet"
            )
        payload = open_envelope(
            blob, self.known, sender=COORDINATOR, run=run, round_=round_, kind="evaluation-state"
        )
        records = self.fed.evaluate_clients([self.client], decode_state(payload))
        body = json.dumps(records, default=float).encode()
        sealed = seal(body, self.identity, run=run, round_=round_, kind="evaluation")
        return self.exchange.put(self.exchange.evaluation(round_, self.client), sealed)

    def run_task(self, task: str, round_: int) -> int:
        """``train`` or ``evaluate`` (what a launcher asks of the site)."""
        if task not in TASKS:
            raise ValueError(
                f"site '{self.client}': unknown task {task!r}; allowed: {', '.join(TASKS)}"
            )
        return self.train(round_) if task == "train" else self.evaluate(round_)


class Launcher(Protocol):
    """Starts a site's task (``train`` or ``evaluate``) for a round and waits for it."""

    def launch(self, site: str, round_: int, task: str = "train") -> Any: ...

    def launch_all(self, sites: list[str], round_: int, task: str = "train") -> dict[str, Any]:
        """:meth:`launch` at each of ``sites`` (at once where it can): site -> handle."""

    def wait(self, handle: Any, timeout: float) -> None:
        """Returns when the site is done; raises its error, or ``TimeoutError`` at ``timeout``
        (and stops the site's task)."""
        ...

    def finished(self, handle: Any) -> bool:
        """Whether the site's task has ended (it will send nothing more)."""
        ...


@dataclass
class InProcessLauncher:
    """Each site's :meth:`SiteSession.train` on a thread of this process (tests, benchmarks)."""

    sessions: dict[str, SiteSession]
    workers: int = 4
    _pool: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="site")

    def launch(self, site: str, round_: int, task: str = "train") -> Future:
        return self._pool.submit(self.sessions[site].run_task, task, round_)

    def launch_all(self, sites: list[str], round_: int, task: str = "train") -> dict[str, Any]:
        return {site: self.launch(site, round_, task) for site in sites}

    def wait(self, handle: Future, timeout: float) -> None:
        try:
            handle.result(timeout=timeout)
        except FutureTimeout:
            raise TimeoutError from None

    def finished(self, handle: Future) -> bool:
        return handle.done()

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
    #: with the secure sum: the seconds each SecAgg+ stage waits for the sites, after training
    stage_deadline: float = 120.0
    #: bytes through the exchange store per site, last round: (to the site, from the site)
    traffic: dict[str, tuple[int, int]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    _secure: CoordinatorSecureSum | None = field(default=None, init=False, repr=False)
    _handles: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

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
        if fed.privacy.secure:
            return self._train_secure(fed, state, chosen, sent)
        updates, failed = self._gather(
            chosen, round_, "train", lambda site: self._receive(site, round_, state)
        )
        self.traffic = {site: (sent, size) for site, (_, size) in updates.items()}
        return [updates[s][0] for s in chosen if s in updates], failed, 0

    def _train_secure(
        self, fed: Federation, state: ServerState, chosen: list[str], sent: int
    ) -> tuple[list[ClientUpdate], dict[str, ClientFailure], int]:
        """Training under the secure sum: each site trains and says it is ready (its update's
        layout only), then waits at the site for the sum (:meth:`group_aggregate`); the updates
        returned stand for the ready sites' layout, with no values (:mod:`fedmtl.sites.secure`)."""
        round_ = state.round + 1
        handles = self.launcher.launch_all(chosen, round_, "train")
        secure = CoordinatorSecureSum(
            self.exchange,
            self.coordinator,
            self.known,
            fed.privacy,
            round_,
            finished=lambda site: self.launcher.finished(handles[site]),
            stage_deadline=self.deadline,
        )
        ready = secure.collect("ready", chosen)
        secure.stage_deadline = self.stage_deadline
        updates, failed = [], {}
        for site in chosen:
            why = secure.dropped.pop(site, None)
            if site in ready:
                try:
                    update = stand_in(site, json.loads(ready[site][0]))
                    check_update(update, state)
                except Exception as exc:  # noqa: BLE001 - a layout the model does not have
                    failed[site] = ClientFailure(
                        FailureKind.REJECTED, type(exc).__name__, f"site '{site}': {exc}"
                    )
                    continue
                updates.append(update)
            elif why is not None and site in secure.refused:
                failed[site] = ClientFailure(FailureKind.REJECTED, "EnvelopeRefused", why)
            else:
                failed[site] = self._not_ready(site, handles[site])
        secure.refused.clear()
        for site in chosen:
            secure.traffic.setdefault(site, [0, 0])[0] += sent
        self._secure, self._handles = secure, handles
        return updates, failed, 0

    def _not_ready(self, site: str, handle: Any) -> ClientFailure:
        """Why a site sent nothing: its own error, or late (its task is stopped)."""
        try:
            self.launcher.wait(handle, 0.0)
        except TimeoutError:
            return ClientFailure.of(
                SiteLate(
                    f"site '{site}': nothing by the round's deadline ({self.deadline:g} s); dropped"
                )
            )
        except Exception as exc:  # noqa: BLE001 - the site's own error, named in the report
            return ClientFailure.of(exc)
        return ClientFailure(
            FailureKind.REJECTED, "EnvelopeRefused", f"site '{site}': finished but sent nothing"
        )

    def group_aggregate(
        self,
        fed: Federation,
        updates: list[ClientUpdate],
        state: ServerState,
        clients: list[str],
        per_round: float,
    ) -> tuple[dict[str, GroupAggregate], RoundPrivacy | None]:
        """As in simulation; under the secure sum, each release is summed by SecAgg+ across its
        member sites (:class:`fedmtl.sites.secure.CoordinatorSecureSum`), and the sites dropped
        from it are named in the round's privacy report."""
        secure, handles = self._secure, self._handles
        if secure is None:
            return fed.aggregate(updates, state, clients, per_round)
        self._secure, self._handles = None, {}
        privacy = None
        try:
            groups, privacy = fed.aggregate(updates, state, clients, per_round, summer=secure)
        finally:
            secure.hold_back(
                [u.client for u in updates], privacy.held_back if privacy is not None else {}
            )
            self._finish(handles)
            self.traffic = {site: (a, b) for site, (a, b) in secure.traffic.items()}
        if privacy is not None and secure.dropped:
            privacy.dropped_mid_protocol = sorted(
                set(privacy.dropped_mid_protocol) | set(secure.dropped)
            )
            privacy.dropped_reasons = dict(secure.dropped)
        return groups, privacy

    def _finish(self, handles: dict[str, Any]) -> None:
        """Waits a stage's deadline at most for the sites' tasks to end (stopping the rest);
        their errors are already in the round's report."""
        end = self.clock() + self.stage_deadline
        for site, handle in handles.items():
            try:
                self.launcher.wait(handle, max(0.0, end - self.clock()))
            except Exception as exc:  # noqa: BLE001 - reported through the protocol already
                log.info("site '%s': its task ended with %s", site, exc)

    def evaluate(
        self, fed: Federation, state: ServerState, clients: list[str]
    ) -> tuple[pd.DataFrame, dict[str, float], dict[str, ClientFailure]]:
        """Each site scores the state on its own held-out rows; a site that is late, fails or
        sends a refused message is left out, named. Per-client records only (module docs)."""
        if not fed.privacy.per_client_metrics:
            raise NotImplementedError(
                "evaluation at sites with per-client metrics off "
                "(privacy.evaluation.client_metrics, off by default with privacy on) needs the "
                "secure sum across site processes, which is not built yet; set "
                "privacy.evaluation.client_metrics=true where privacy allows it"
            )
        round_, run = state.round, self.exchange.run
        self.exchange.put(
            self.exchange.evaluation_state(round_),
            seal(
                encode_state(state),
                self.coordinator,
                run=run,
                round_=round_,
                kind="evaluation-state",
            ),
        )
        got, skipped = self._gather(
            clients, round_, "evaluate", lambda site: self._records(site, round_)
        )
        records = [r for site in clients if site in got for r in got[site][0]]
        return pd.DataFrame(records), {}, skipped

    def _gather(
        self, sites: list[str], round_: int, task: str, receive
    ) -> tuple[dict, dict[str, ClientFailure]]:
        """Starts ``task`` at every site, waits until the deadline, receives what each sent:
        (site -> (what, bytes), site -> why it was dropped or refused)."""
        handles = self.launcher.launch_all(sites, round_, task)
        end = self.clock() + self.deadline
        failed: dict[str, ClientFailure] = {}
        got: dict[str, tuple[Any, int]] = {}
        for site, handle in handles.items():
            try:
                self.launcher.wait(handle, max(0.0, end - self.clock()))
            except TimeoutError:
                failed[site] = ClientFailure.of(
                    SiteLate(
                        f"site '{site}': nothing by the round's deadline "
                        f"({self.deadline:g} s); dropped"
                    )
                )
                continue
            except Exception as exc:  # noqa: BLE001 - the site's own error, named in the report
                failed[site] = ClientFailure.of(exc)
                continue
            try:
                got[site] = receive(site)
            except Exception as exc:  # noqa: BLE001 - refused (tampered, replayed, unreadable): named
                message = str(exc) if f"site '{site}'" in str(exc) else f"site '{site}': {exc}"
                failed[site] = ClientFailure(FailureKind.REJECTED, type(exc).__name__, message)
        return got, failed

    def _open(self, site: str, path: str, round_: int, kind: str) -> tuple[bytes, int]:
        """The payload of ``site``'s ``kind`` message at ``path`` and its sealed size; refused,
        naming the site, when it is missing or does not open."""
        blob = self.exchange.get(path)
        if blob is None:
            raise EnvelopeRefused(
                site, f"site '{site}': finished but left no {kind} for round {round_}"
            )
        payload = open_envelope(
            blob, self.known, sender=site, run=self.exchange.run, round_=round_, kind=kind
        )
        return payload, len(blob)

    def _records(self, site: str, round_: int) -> tuple[list[dict], int]:
        payload, size = self._open(
            site, self.exchange.evaluation(round_, site), round_, "evaluation"
        )
        records = json.loads(payload)
        if not isinstance(records, list) or any(r.get("client") != site for r in records):
            raise EnvelopeRefused(
                site, f"site '{site}': its evaluation holds records of other clients"
            )
        return records, size

    def _receive(self, site: str, round_: int, state: ServerState) -> tuple[ClientUpdate, int]:
        payload, size = self._open(site, self.exchange.update(round_, site), round_, "update")
        update = decode_update(payload)
        if update.client != site:
            raise EnvelopeRefused(
                site, f"site '{site}': its update names another client, '{update.client}'"
            )
        check_update(update, state)
        return update, size
