"""The five steps of a federated round as Prefect tasks, and :class:`PrefectSteps`, the round
loop's steps (:mod:`fedmtl.rounds`) run through them: each task a thin call into fedmtl/.

No task caches its inputs (``NO_CACHE``): states and updates are tensors that change every
round, and hashing them would cost more than the work. Large inputs go to the tasks
``quote``d: Prefect would otherwise walk every field of the federation, the state and the
updates looking for futures on each task call (measured at ~14 ms a task on W, more than the
steps' own work); no input here is a future.
"""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from fedmtl.config import Config
from fedmtl.dispatch import default_workers, shards
from fedmtl.federation import Federation
from fedmtl.private_aggregation import RoundPrivacy
from fedmtl.rounds import Steps
from fedmtl.state import ClientFailure, ClientUpdate, GroupAggregate, ServerState
from flows import progress

_STEPS = Steps()  # the steps themselves, as plain calls


@task(name="dispatch", cache_policy=NO_CACHE)
def dispatch(fed: Federation, clients: list[str], per_round: float, round_: int) -> list[str]:
    """Sample this round's clients; each trains against its group's heads."""
    return _STEPS.dispatch(fed, clients, per_round, round_)


def _shard_name() -> str:
    clients = task_run.parameters.get("clients") or []
    return f"train-{clients[0]}..{clients[-1]}" if clients else "train-empty"


@task(name="local_train_shard", task_run_name=_shard_name, cache_policy=NO_CACHE)
def local_train_shard(
    clients: list[str], fed: Federation, state: ServerState
) -> tuple[list[ClientUpdate], dict[str, ClientFailure]]:
    """Local training of a shard of clients (``fedmtl.dispatch.shards``), batched when the
    method and model allow it (``training.batched``); each client's update carries its own
    metrics and its personal state stays in its own store. Returns (updates, failed clients
    with their errors): a client that fails is left out and logged (the shard's other clients
    still count); the task fails only if the whole shard does (e.g. ``training.batched: on``
    with a method that cannot batch)."""
    failed: dict[str, ClientFailure] = {}
    updates = fed.train_clients(clients, state, failed)
    if failed:
        logger = get_run_logger()
        for client, error in failed.items():
            logger.warning("client '%s' failed: %s", client, error)
    return updates, failed


def _retry_name() -> str:
    return f"retry-{task_run.parameters.get('client', 'client')}"


@task(name="retry_client", task_run_name=_retry_name, cache_policy=NO_CACHE)
def retry_client(client: str, fed: Federation, state: ServerState, retries: int) -> ClientUpdate | ClientFailure:
    """A client that failed in its shard, trained again on its own. The task raises while the
    client fails and retries are left, so that Prefect retries it (``training.client_retries``,
    with exponential backoff from ``training.retry_delay``); after the last one it returns the
    error (a warning, not a failed task: the round goes on without the client)."""
    try:
        return fed.train_clients([client], state, attempt=task_run.run_count)[0]
    except Exception as exc:  # noqa: BLE001 - reported per client
        if task_run.run_count < retries:  # run k of this task is retry k; Prefect runs it `retries` times
            raise
        get_run_logger().warning("client '%s' still fails after %d retries: %s", client, retries, exc)
        return ClientFailure.of(exc, f" (tried {retries} more times, with backoff)")


@task(name="group_aggregate", cache_policy=NO_CACHE)
def group_aggregate(
    fed: Federation, updates: list[ClientUpdate], state: ServerState, clients: list[str], per_round: float
) -> tuple[dict[str, GroupAggregate], RoundPrivacy | None]:
    """Per group, the mean update; with ``privacy`` on, the private releases (clipped, summed
    under SecAgg+, noised) and their report."""
    return _STEPS.group_aggregate(fed, updates, state, clients, per_round)


@task(name="global_merge", cache_policy=NO_CACHE)
def global_merge(
    fed: Federation,
    state: ServerState,
    groups: dict[str, GroupAggregate],
    updates: list[ClientUpdate] | None = None,
    privacy: RoundPrivacy | None = None,
) -> ServerState:
    """Merge across groups with the server optimiser (and learn groups when that is due)."""
    return _STEPS.global_merge(fed, state, groups, updates, privacy)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    fed: Federation, state: ServerState, clients: list[str]
) -> tuple[pd.DataFrame, dict[str, float], dict[str, ClientFailure]]:
    """Every client scores global, group and personalised models on its own held-out split:
    per-client records, or, when per-client metrics are off (privacy), no records and the
    metrics pooled from the clients' summed statistics. A client whose partition cannot be used
    (missing, changed after validation, NaN or infinite rows: :class:`fedmtl.client.PartitionError`)
    is left out and logged; the others are scored. Returns (records, pooled metrics, skipped
    client -> error)."""
    records, pooled, skipped = _STEPS.evaluate(fed, state, clients)
    if skipped:
        logger = get_run_logger()
        for client, error in skipped.items():
            logger.warning("client '%s' not evaluated: %s", client, error)
    return records, pooled, skipped


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
        parts = shards(chosen, self.cfg.training.clients_per_task, shard_workers(self.cfg, fed), fed.train_rows())
        futures = local_train_shard.map(parts, unmapped(self.shared(fed)), unmapped(self.shared(state)))
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
        # the retry task's first run is the first retry: Prefect retries it the other retries - 1 times
        options = {"retries": retries - 1,
                   "retry_delay_seconds": exponential_backoff(backoff_factor=delay) if delay else 0}
        if cfg.runner.kind != "thread":  # Prefect cannot interrupt a thread; there the client's own deadline acts
            options["timeout_seconds"] = cfg.training.client_timeout
        futures = retry_client.with_options(**options).map(again, unmapped(self.shared(fed)),
                                                           unmapped(self.shared(state)), retries)
        back = 0
        for client, future in zip(again, futures):
            future.wait()
            result = (future.result() if future.state.is_completed()
                      else ClientFailure.of(future.state.result(raise_on_failure=False)))
            if isinstance(result, ClientFailure):
                failed[client] = result
            else:
                updates.append(result)
                del failed[client]
                back += 1
        if back:
            updates.sort(key=lambda u: u.client)  # the same order whichever attempt an update came from
        return back

    def group_aggregate(self, fed, updates, state, clients, per_round):
        return group_aggregate(quote(fed), quote(updates), quote(state), quote(clients), per_round)

    def global_merge(self, fed, state, groups, updates, privacy):
        return global_merge(quote(fed), quote(state), quote(groups), quote(updates) if updates is not None else None,
                            quote(privacy))

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
