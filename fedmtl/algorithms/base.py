"""What a federated method is, in one interface, so that one flow runs them all.

A method decides, for each part of the model (the base θ and the task heads):

- whether clients **release** an update of it (``shares_base``, ``shares_heads``);
- at which level the server keeps the released heads (``head_scope``: one ``global`` head, or
  one per ``group``);
- what the client does in a round (:meth:`Algorithm.client_round`), and what it keeps
  (a :class:`~fedmtl.state.PersonalState`);
- which weights the client calls its **personalised** model (:meth:`Algorithm.personalized`).

Methods whose client round is the **standard shared step** (``batchable``: train base and
heads jointly from a start for ``local_epochs``, FedProx's μ optional, and release what
changed) say so by defining :meth:`Algorithm.shared_start` (where a client starts from) and
:meth:`Algorithm.shared_result` (its update and personal state from the trained weights);
:meth:`Algorithm.shared_round` is then their ``client_round``, and
:func:`fedmtl.client.batched.train_shared` can train many such clients at once.

Every method is scored with the same three variants on each client's held-out split:
``global`` (θ, φ₀), ``group`` (θ, φ_g; φ₀ for methods without groups) and ``personal``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedmtl.client.data import ClientData, labelled_counts
from fedmtl.client.training import LocalConfig, train_joint
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector

#: The one group of methods that do not group clients.
ALL = "all"


@dataclass
class ClientContext:
    """What a client procedure works with: a fresh model, the tasks, settings and its RNG."""

    model: nn.Module
    tasks: list[TaskSpec]
    cfg: LocalConfig
    generator: torch.Generator
    round: int


@dataclass
class SharedStart:
    """Where a client's shared step starts from: base, heads (every task) and FedProx's μ."""

    base: Vector
    heads: Heads
    prox_mu: float = 0.0


class Algorithm:
    name: ClassVar[str]
    #: clients release Δθ / Δφ
    shares_base: ClassVar[bool] = True
    shares_heads: ClassVar[bool] = True
    #: ``group``: one head per group (learned or given); ``global``: one head for everyone
    head_scope: ClassVar[str] = "global"
    #: whether clients are grouped (``grouping`` applies); else every client is in group ``all``
    uses_groups: ClassVar[bool] = False
    #: whether the server needs distinct initial group heads (clusters are found by loss)
    learns_groups: ClassVar[bool] = False
    #: whether ``client_round`` is the standard shared step (``shared_start`` → train_joint of
    #: base and heads for ``local_epochs`` → ``shared_result``), so clients can be trained in
    #: batches (:mod:`fedmtl.client.batched`)
    batchable: ClassVar[bool] = False

    def build_model(self, model: nn.Module, tasks: Sequence[TaskSpec]) -> nn.Module:
        """The model this method trains, scores and keeps server state for, made from the
        configured multi-task model (``model.base``, ``model.heads[task]``). Default: that model.
        A method with more parts (GPFL's conditional valve, FedEM's components) returns its own
        module with the same two attributes: ``base`` (the vector ``shares_base`` releases and the
        server averages) and ``heads`` (one module per task: the vectors ``shares_heads``
        releases). Evaluation scores ``heads[task](base(x))`` with each variant's vectors, so
        every variant, the personalised one included, must be such a pair of vectors."""
        return model

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        raise NotImplementedError

    def shared_start(
        self, cfg: LocalConfig, state: ServerState, group: str, personal: PersonalState | None
    ) -> SharedStart:
        """Batchable methods: the (base, heads, μ) the client's shared step starts from."""
        raise NotImplementedError(f"algorithm '{self.name}' has no standard shared step")

    def shared_result(
        self,
        data: ClientData,
        group: str,
        state: ServerState,
        start: SharedStart,
        base: Vector,
        heads: Heads,
        loss: float,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        """Batchable methods: what the client releases and keeps after its shared step.
        Default: Δθ and Δφ against the start, ``train_loss``; no personal state."""
        update = self.update(
            data, group, base - start.base, diff(heads, start.heads), train_loss=loss
        )
        return update, None

    def shared_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        """The per-client shared step: the ``client_round`` of every batchable method."""
        start = self.shared_start(ctx.cfg, state, group, personal)
        base, heads, loss = train_joint(
            ctx.model,
            start.base,
            start.heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
            prox_mu=start.prox_mu,
        )
        return self.shared_result(data, group, state, start, base, heads, loss, personal)

    def extra_heads(self, model: nn.Module) -> Heads:
        """Named vectors besides the task heads that the server keeps from round 0 with the heads
        (in ``global_heads`` and every group's heads) and aggregates exactly like them (the
        weighted mean of the clients' deltas, stepped by the server optimiser): the channel for a
        statistic the server must combine over clients (FedDBE's global representation mean).
        Their keys must not be task names; a method with extra heads releases a delta for each.
        Default: none."""
        return {}

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, PersonalState | None]:
        """The client's personalised weights (base, heads) for evaluation and serving, and
        the personal state to keep if evaluation produced a new one (else None). Default:
        the personal state's parts where it has them, the server's otherwise."""
        received = state.heads_for(group if self.head_scope == "group" else None)
        if personal is None:
            return state.base, received, None
        base = personal.base if personal.base is not None else state.base
        heads = personal.heads or received
        return base, heads, None

    # helpers shared by the methods ------------------------------------------------------

    def update(
        self,
        data: ClientData,
        group: str,
        delta_base: Vector | None,
        delta_heads: Heads,
        **metrics: float,
    ) -> ClientUpdate:
        return ClientUpdate(
            client=data.client,
            group=group,
            n_samples=data.n_train,
            delta_base=delta_base if self.shares_base else None,
            delta_heads=delta_heads if self.shares_heads else {},
            metrics=dict(metrics),
            task_samples=labelled_counts(data),
        )


def copy_heads(heads: Heads) -> Heads:
    return {t: v.clone() for t, v in heads.items()}


def diff(new: Heads, old: Heads) -> Heads:
    return {t: new[t] - old[t] for t in old}
