"""The round loop's steps (:mod:`fedmtl.rounds`) run as the Prefect tasks of ``tasks/round.py``.

Large inputs go to the tasks ``quote``d: Prefect would otherwise walk every field of the
federation, the state and the updates looking for futures on each task call (measured at
~14 ms a task on W, more than the steps' own work); no input here is a future.
"""

from __future__ import annotations

from prefect import unmapped
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from fedmtl.config import Config
from fedmtl.federation import Federation
from fedmtl.rounds import Steps
from fedmtl.server.dispatch import default_workers, shards
from fedmtl.state import ClientFailure
from flows import progress
from tasks.round import (
    dispatch,
    evaluate,
    global_merge,
    group_aggregate,
    local_train_shard,
    retry_client,
)


class PrefectSteps(Steps):
    """The round's steps as Prefect tasks (the ``fedmtl-train`` flow): a round's clients in
    shards mapped over the task runner (``runner``), progress reported as shards finish, the
    failed clients retried each in its own task with exponential backoff
    (``training.client_retries``, ``retry_delay``, ``client_timeout``)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # submitted to another process (process, Dask), a quoted input would arrive still wrapped
        self.shared = quote if cfg.runner.kind == "thread" else (lambda value: value)

    def dispatch(self, fed, clients, per_round, round_):
        return dispatch(quote(fed), quote(clients), per_round, round_)

    def local_train(self, fed, state, chosen):
        parts = shards(
            chosen,
            self.cfg.training.clients_per_task,
            shard_workers(self.cfg, fed),
            fed.train_rows(),
        )
        futures = local_train_shard.map(
            parts, unmapped(self.shared(fed)), unmapped(self.shared(state))
        )
        progress.current().round_started(state.round + 1, len(chosen))
        sizes = {id(f): len(p) for f, p in zip(futures, parts)}
        for done in as_completed(futures):
            progress.current().client_done(sizes[id(done)])
        updates, failed = [], {}
        for part, future in zip(parts, futures):
            future.wait()  # keeps the task's own final state: the API records states asynchronously
            if future.state.is_completed():
                trained, lost = future.result()
                updates += trained
                failed.update(lost)
            else:  # the whole shard failed
                error = ClientFailure.of(future.state.result(raise_on_failure=False))
                failed.update({client: error for client in part})
        retried = self.retry_failed(fed, state, failed, updates)
        return updates, failed, retried

    def retry_failed(self, fed, state, failed: dict[str, ClientFailure], updates: list) -> int:
        """Train the round's failed clients again, each in its own task that Prefect retries
        with exponential backoff. Updates that arrive join ``updates`` and leave ``failed``; a
        client that still fails stays there, its message saying how often it was tried. Clients
        cut off by the timeout, whose update was rejected or whose partition cannot be used are
        not retried. Returns how many clients came back on a retry."""
        cfg = self.cfg
        again = [c for c, failure in failed.items() if failure.retryable]
        if not again or cfg.training.client_retries == 0:
            return 0
        delay = cfg.training.retry_delay
        retries = cfg.training.client_retries
        # the retry task's first run is the first retry: Prefect retries it the other
        # retries - 1 times
        options = {
            "retries": retries - 1,
            "retry_delay_seconds": exponential_backoff(backoff_factor=delay) if delay else 0,
        }
        if (
            cfg.runner.kind != "thread"
        ):  # Prefect cannot interrupt a thread; there the client's own deadline acts
            options["timeout_seconds"] = cfg.training.client_timeout
        futures = retry_client.with_options(**options).map(
            again, unmapped(self.shared(fed)), unmapped(self.shared(state)), retries
        )
        back = 0
        for client, future in zip(again, futures):
            future.wait()
            result = (
                future.result()
                if future.state.is_completed()
                else ClientFailure.of(future.state.result(raise_on_failure=False))
            )
            if isinstance(result, ClientFailure):
                failed[client] = result
            else:
                updates.append(result)
                del failed[client]
                back += 1
        if back:
            updates.sort(
                key=lambda u: u.client
            )  # the same order whichever attempt an update came from
        return back

    def group_aggregate(self, fed, updates, state, clients, per_round):
        return group_aggregate(quote(fed), quote(updates), quote(state), quote(clients), per_round)

    def global_merge(self, fed, state, groups, updates, privacy):
        return global_merge(
            quote(fed),
            quote(state),
            quote(groups),
            quote(updates) if updates is not None else None,
            quote(privacy),
        )

    def evaluate(self, fed, state, clients):
        return evaluate(quote(fed), quote(state), quote(clients))


def shard_workers(cfg: Config, fed: Federation) -> int:
    """Workers to spread a round's shards over: ``runner.workers``, else the CPU count, except
    for batched training on threads: a batched shard is many small torch calls that hold the
    GIL, and two such shards in two threads measured twice as slow as one (1,000 Synthetic
    clients: 10.2 s against 5.1 s per round), while the per-client path gains from threads."""
    if cfg.runner.workers:
        return cfg.runner.workers
    if cfg.runner.kind == "thread" and fed.uses_batching():
        return 1
    return default_workers()
