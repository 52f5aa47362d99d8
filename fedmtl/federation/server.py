"""The coordinator's side of a round (:class:`ServerSteps`, a part of
:class:`fedmtl.federation.Federation`): the initial state, dispatch, screening the updates
(weights from the manifest, outsized norms refused), the group aggregate (plain or private, as
:attr:`Federation.release` does it) and the global merge, with the privacy stages' own server
state. It sees what clients release, never their data.
"""

from __future__ import annotations

import copy
import functools

import torch

from fedmtl.algorithms import ALL
from fedmtl.privacy.aggregation import RoundPrivacy, Summer
from fedmtl.privacy.sample_level import EPSILON_KEY, client_epsilons
from fedmtl.server.aggregation import global_merge
from fedmtl.server.grouping import WARMUP_GROUP, regroup
from fedmtl.server.screening import screen_norms
from fedmtl.state import (
    ClientFailure,
    ClientUpdate,
    GroupAggregate,
    ServerState,
    flat,
    initial_state,
)


class ServerSteps:
    """The coordinator-side methods of :class:`fedmtl.federation.Federation`."""

    def initial_state(self) -> ServerState:
        """Round 0: the model's initial weights, plus the method's extra heads (if any) beside the
        task heads (:meth:`fedmtl.algorithms.base.Algorithm.extra_heads`)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self.new_model()
            state = self._initial_state(model)
        extra = self.algorithm.extra_heads(model)
        for heads in [state.global_heads, *state.group_heads.values()]:
            heads.update({k: v.clone() for k, v in extra.items()})
        return state

    def _initial_state(self, model: torch.nn.Module) -> ServerState:
        method = self.grouping_method
        if method is None:
            return initial_state(model, [], {c: ALL for c in self.groups})
        if method == "column":
            return initial_state(model, sorted(set(self.groups.values())) or ["0"], self.groups)
        if method == "cluster":
            return initial_state(model, [WARMUP_GROUP])
        # ifca: k heads, each its own random initialisation, so that losses differ
        names = [str(i) for i in range(self.grouping.n_groups)]
        heads = [{t: _fresh_head(h) for t, h in model.heads.items()} for _ in names]
        return initial_state(model, names, distinct_heads=heads)

    def participants(self, clients: list[str], per_round: float, round_: int) -> list[str]:
        """The dispatch step: this round's clients (:attr:`release` decides how they are drawn)."""
        return self.release.participants(clients, per_round, round_)

    def aggregate(
        self,
        updates: list[ClientUpdate],
        state: ServerState,
        clients: list[str],
        per_round: float = 1.0,
        summer: Summer | None = None,
    ) -> tuple[dict[str, GroupAggregate], RoundPrivacy | None]:
        """The group_aggregate step, as :attr:`release` does it: plain per-group means, or the
        private releases of :mod:`fedmtl.privacy.aggregation` and their report; ``summer``: the
        secure sum where the clients are (sites), ``updates`` then giving their layout only."""
        where = {} if summer is None else {"summer": summer}
        return self.release.aggregate(
            updates,
            state,
            clients,
            per_round,
            lambda c: self.release_group(c, state),
            self.manifest_rows,
            **where,
        )

    def screen(
        self, updates: list[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, ClientFailure]]:
        """Bounded influence, before any aggregation: each update's weight is its client's train
        rows *as the manifest records them* (never the count a client reports), and, with
        ``server.max_norm_ratio`` and no privacy mechanism (under DP every update is clipped to
        C; under a secure sum the server never sees one, and each coordinate is clipped to
        ±``privacy.secure_sum.range``), an update whose L2 norm exceeds that multiple of the
        round's lower median norm is refused (:func:`fedmtl.server.screening.screen_norms`).
        A client's per-task counts (``task_samples``, optional tasks) are clamped to those rows:
        a client cannot weigh more on one head than on the base. Returns (kept updates, refused
        client -> reason)."""
        for u in updates:
            u.n_samples = self.manifest_rows(u.client)
            if u.task_samples is not None:
                u.task_samples = {
                    t: min(max(int(c), 0), u.n_samples) for t, c in u.task_samples.items()
                }
        return screen_norms(updates, self.max_norm_ratio if self.release.screens_norms else None)

    def release_group(self, client: str, state: ServerState) -> str:
        """The group whose sum ``client`` joins (fixed and public, as DP requires)."""
        if self.grouping_method is None:
            return ALL
        return state.assignment.get(client) or self.groups.get(client) or "0"

    @functools.cached_property
    def _train_rows(self) -> dict[str, int]:
        return {c.client: c.n_train for c in self.manifest.clients}

    def manifest_rows(self, client: str) -> int:
        """The client's train rows as the manifest records them (public sizes: the scale of
        the weights in a secure sum)."""
        return self._train_rows.get(client, 0)

    def needs_updates_to_merge(self, state: ServerState) -> bool:
        """Whether :meth:`merge` needs the round's client updates, not only the group aggregates:
        to learn groups, to record DP-SGD's ε, or to step the base by a robust rule over clients."""
        return (
            self.regroup_due(state) or self.sample_level is not None or self.robust.rule != "mean"
        )

    def merge(
        self,
        state: ServerState,
        groups: dict[str, GroupAggregate],
        updates: list[ClientUpdate] | None = None,
        privacy: RoundPrivacy | None = None,
    ) -> ServerState:
        """The server step: merge the group aggregates; at the end of the warm-up of
        ``grouping: cluster``, split the clients into learned groups; then the privacy stages'
        own state: adaptive clipping's C (:attr:`release`), every client's DP-SGD ε
        (:attr:`sample_level`)."""
        robust_base = (
            updates if self.robust.rule != "mean" else None
        )  # the base outvoted over clients
        merged = global_merge(
            state,
            groups,
            self.weighting,
            self.optimizer,
            self.algorithm.head_scope,
            self.robust,
            robust_base,
        )
        self.release.after_merge(state, merged, privacy)
        if self.regroup_due(state) and updates:
            merged, _ = regroup(state, merged, updates, self.grouping)
        if self.sample_level is not None and updates:
            reports = {
                u.client: u.metrics["dp_sgd_epsilon"]
                for u in updates
                if "dp_sgd_epsilon" in u.metrics
            }
            merged.privacy[EPSILON_KEY] = self.sample_level.record(
                state.privacy.get(EPSILON_KEY), self.manifest.client_ids, reports
            )
        return merged

    def dp_sgd_metrics(self, state: ServerState) -> dict[str, float]:
        """``privacy/dp_sgd_epsilon_max`` and ``_mean`` over the clients that have trained so far
        (empty without DP-SGD)."""
        if self.sample_level is None:
            return {}
        return client_epsilons(state.privacy.get(EPSILON_KEY))

    def regroup_due(self, state: ServerState) -> bool:
        return self.grouping_method == "cluster" and state.round + 1 == self.grouping.warmup_rounds


def _fresh_head(head: torch.nn.Module) -> torch.Tensor:
    """A new random initialisation of ``head`` (each layer's own ``reset_parameters``), flat."""
    clone = copy.deepcopy(head)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return flat(clone)
