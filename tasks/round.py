"""The five steps of a federated round as Prefect tasks, each a thin call into fedmtl/ (the
round loop, :mod:`fedmtl.rounds`, runs them through ``flows.steps.PrefectSteps``).

No task caches its inputs (``NO_CACHE``): states and updates are tensors that change every
round, and hashing them would cost more than the work.
"""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from fedmtl.federation import Federation
from fedmtl.privacy.aggregation import RoundPrivacy
from fedmtl.rounds import Steps
from fedmtl.state import ClientFailure, ClientUpdate, GroupAggregate, ServerState

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
    """Local training of a shard of clients (``fedmtl.server.dispatch.shards``), batched when the
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
def retry_client(
    client: str, fed: Federation, state: ServerState, retries: int
) -> ClientUpdate | ClientFailure:
    """A client that failed in its shard, trained again on its own. The task raises while the
    client fails and retries are left, so that Prefect retries it (``training.client_retries``,
    with exponential backoff from ``training.retry_delay``); after the last one it returns the
    error (a warning, not a failed task: the round goes on without the client)."""
    try:
        return fed.train_clients([client], state, attempt=task_run.run_count)[0]
    except Exception as exc:  # noqa: BLE001 - reported per client
        if (
            task_run.run_count < retries
        ):  # run k of this task is retry k; Prefect runs it `retries` times
            raise
        get_run_logger().warning(
            "client '%s' still fails after %d retries: %s", client, retries, exc
        )
        return ClientFailure.of(exc, f" (tried {retries} more times, with backoff)")


@task(name="group_aggregate", cache_policy=NO_CACHE)
def group_aggregate(
    fed: Federation,
    updates: list[ClientUpdate],
    state: ServerState,
    clients: list[str],
    per_round: float,
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
    (missing, changed after validation, NaN or infinite rows:
    :class:`fedmtl.client.data.PartitionError`) is left out and logged; the others are scored.
    Returns (records, pooled metrics, skipped client -> error)."""
    records, pooled, skipped = _STEPS.evaluate(fed, state, clients)
    if skipped:
        logger = get_run_logger()
        for client, error in skipped.items():
            logger.warning("client '%s' not evaluated: %s", client, error)
    return records, pooled, skipped
