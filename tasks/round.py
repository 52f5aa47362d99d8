"""The five steps of a federated round as Prefect tasks (each a thin call into fedmtl/).

No task caches its inputs (``NO_CACHE``): states and updates are tensors that change every
round, and hashing them would cost more than the work.
"""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedmtl import aggregation
from fedmtl.federation import Federation, participants
from fedmtl.state import ClientUpdate, GroupAggregate, ServerState


@task(name="dispatch", cache_policy=NO_CACHE)
def dispatch(fed: Federation, clients: list[str], per_round: float, round_: int) -> list[str]:
    """Sample this round's clients (seeded); each trains against its group's heads."""
    return participants(fed, clients, per_round, round_)


@task(name="local_train", task_run_name="train-{client}", cache_policy=NO_CACHE)
def local_train(client: str, fed: Federation, state: ServerState) -> ClientUpdate:
    """Local training on one client partition; its personal head stays in its store."""
    return fed.client_round(client, state)


@task(name="group_aggregate", cache_policy=NO_CACHE)
def group_aggregate(updates: list[ClientUpdate]) -> dict[str, GroupAggregate]:
    return aggregation.group_aggregate(updates)


@task(name="global_merge", cache_policy=NO_CACHE)
def global_merge(
    fed: Federation,
    state: ServerState,
    groups: dict[str, GroupAggregate],
    updates: list[ClientUpdate] | None = None,
) -> ServerState:
    """Merge across groups with the server optimiser (and learn groups when that is due)."""
    return fed.merge(state, groups, updates)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(fed: Federation, state: ServerState, clients: list[str]) -> pd.DataFrame:
    """Every client scores global, group and personalised models on its own held-out split."""
    return pd.DataFrame([r for c in clients for r in fed.client_evaluate(c, state)])
