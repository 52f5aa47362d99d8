"""FedPer (Arivazhagan et al. 2019): a shared base, a personal head per client.

The client trains base and its personal head together for ``local_epochs`` and releases only
Δθ; the head never leaves it."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, copy_heads
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class FedPer(Algorithm):
    name = "fedper"
    shares_heads = False

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        heads = personal.heads if personal is not None else copy_heads(state.global_heads)
        base, heads, loss = train_joint(
            ctx.model,
            state.base,
            heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
            prox_mu=ctx.cfg.prox_mu,
        )
        return self.update(data, group, base - state.base, {}, train_loss=loss), PersonalState(
            heads
        )
