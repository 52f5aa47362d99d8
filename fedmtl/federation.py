"""One federation: the clients' side of a round, as plain functions over explicit state.

:class:`Federation` bundles what every client step needs (where the partitions are, the
model architecture, local training settings, the client stores); the Prefect tasks in
``tasks/`` are thin wrappers over its methods, and :func:`run_rounds` is the same round
without any orchestrator (tests, benchmarks, debugging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedmtl.aggregation import global_merge, group_aggregate
from fedmtl.client import ClientData, load_client_data
from fedmtl.data.manifest import Manifest
from fedmtl.dispatch import clients_for_round
from fedmtl.evaluation import evaluate_client, summarize
from fedmtl.state import ClientUpdate, ServerState, initial_state
from fedmtl.store import ClientStore
from fedmtl.training import LocalConfig, client_seed, local_train


class RejectedUpdate(ValueError):
    """A client update that must never reach a model (non-finite or wrong shape)."""


@dataclass(frozen=True)
class Federation:
    partitions_dir: Path
    manifest: Manifest
    model_cfg: Any  # fedmtl.config.ModelConfig
    local: LocalConfig
    store: ClientStore
    seed: int = 0
    groups: dict[str, str] = field(default_factory=dict)  # client -> group

    def new_model(self) -> torch.nn.Module:
        from models import build_model  # the torch modules live in the top-level models/ package

        return build_model(
            self.model_cfg, len(self.manifest.features), self.manifest.tasks, self.manifest.input_shape
        )

    def initial_state(self) -> ServerState:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self.new_model()
        return initial_state(model, sorted(set(self.groups.values())) or ["0"])

    def data(self, client: str) -> ClientData:
        return load_client_data(self.partitions_dir, self.manifest, client)

    def group_of(self, client: str) -> str:
        return self.groups.get(client) or self.manifest.entry(client).group

    def client_round(self, client: str, state: ServerState) -> ClientUpdate:
        """Local training on ``client``: keeps ψ_c in its store, returns what it releases."""
        data = self.data(client)
        group = self.group_of(client)
        update, personal = local_train(
            self.new_model(),
            state.base,
            state.heads_for(group),
            self.store.load(client),
            data,
            self.manifest.tasks,
            self.local,
            client_seed(self.seed, state.round, client),
        )
        update.group = group
        check_update(update, state)
        self.store.save(client, personal)
        return update

    def client_evaluate(self, client: str, state: ServerState) -> list[dict]:
        """The client scores global, group and personalised models on its held-out split."""
        data = self.data(client)
        group = self.group_of(client)
        heads = {"global": state.global_heads, "group": state.heads_for(group)}
        personal = self.store.load(client)
        heads["personal"] = personal if personal is not None else heads["group"]
        return evaluate_client(self.new_model(), state.base, heads, data, self.manifest.tasks)


def check_update(update: ClientUpdate, state: ServerState) -> None:
    """Reject an update whose shapes do not match the server's or that holds NaN/inf."""
    parts = {"base": (update.delta_base, state.base)}
    ref_heads = state.heads_for(update.group)
    if set(update.delta_heads) != set(ref_heads):
        raise RejectedUpdate(
            f"client '{update.client}': update has heads {sorted(update.delta_heads)}, "
            f"expected {sorted(ref_heads)}"
        )
    parts.update({f"head '{t}'": (update.delta_heads[t], ref_heads[t]) for t in ref_heads})
    for name, (delta, ref) in parts.items():
        if delta.shape != ref.shape:
            raise RejectedUpdate(
                f"client '{update.client}': {name} update has shape {tuple(delta.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(delta).all():
            raise RejectedUpdate(f"client '{update.client}': {name} update holds NaN or inf")


def participants(fed: Federation, clients: list[str], per_round: float, round_: int) -> list[str]:
    return clients_for_round(clients, per_round, fed.seed, round_)


def run_rounds(
    fed: Federation,
    clients: list[str],
    rounds: int,
    per_round: float = 1.0,
    weighting: str = "samples",
    server_lr: float = 1.0,
    state: ServerState | None = None,
) -> tuple[ServerState, pd.DataFrame, list[dict[str, float]]]:
    """The federated round without an orchestrator: returns the final state, the last round's
    per-client records and every round's summary."""
    state = state or fed.initial_state()
    history: list[dict[str, float]] = []
    records = pd.DataFrame()
    for _ in range(rounds):
        chosen = participants(fed, clients, per_round, state.round)
        updates = [fed.client_round(c, state) for c in chosen]
        state = global_merge(state, group_aggregate(updates), weighting, server_lr)
        records = pd.DataFrame([r for c in clients for r in fed.client_evaluate(c, state)])
        history.append(summarize(records))
    return state, records, history

