"""Local-only training: every client trains its own whole model on its own data and releases
nothing. The reference any federated method must beat (no federation, no leakage)."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, copy_heads
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class LocalOnly(Algorithm):
    name = "local"
    shares_base = False
    shares_heads = False

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        if personal is None or personal.base is None:  # round 0's common initialisation
            personal = PersonalState(copy_heads(state.global_heads), state.base.clone())
        base, heads, loss = train_joint(
            ctx.model,
            personal.base,
            personal.heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
        )
        return self.update(data, group, None, {}, train_loss=loss), PersonalState(heads, base)
