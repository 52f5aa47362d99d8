"""LG-FedAvg (Liang et al. 2020): local representations, a global head.

Each client keeps its own base θ_c and trains it with the received global head φ for
``local_epochs``; it releases Δφ only. The personalised model is (θ_c, φ₀)."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector


class LGFedAvg(Algorithm):
    name = "lg-fedavg"
    shares_base = False

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        own = personal.base if personal is not None and personal.base is not None else state.base
        base, heads, loss = train_joint(
            ctx.model,
            own,
            state.global_heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
            prox_mu=ctx.cfg.prox_mu,
        )
        update = self.update(data, group, None, diff(heads, state.global_heads), train_loss=loss)
        return update, PersonalState({}, base)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        base = personal.base if personal is not None and personal.base is not None else state.base
        return base, state.global_heads, None
