"""FedRep (Collins et al. 2021): a shared representation, a personal head per client.

Each round the client first trains its head for ``personal_epochs`` with the received base
frozen, then the base for ``local_epochs`` with the head frozen, and releases Δθ only."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, copy_heads
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_heads, train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class FedRep(Algorithm):
    name = "fedrep"
    shares_heads = False

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg = ctx.cfg
        start = personal.heads if personal is not None else copy_heads(state.global_heads)
        heads, head_loss = train_heads(
            ctx.model, state.base, start, data, ctx.tasks, cfg, ctx.generator, cfg.personal_epochs
        )
        base, _, loss = train_joint(
            ctx.model,
            state.base,
            heads,
            data,
            ctx.tasks,
            cfg,
            ctx.generator,
            cfg.epochs,
            train_head=False,
            prox_mu=cfg.prox_mu,
        )
        update = self.update(
            data, group, base - state.base, {}, train_loss=loss, personal_train_loss=head_loss
        )
        return update, PersonalState(heads)
