"""IFCA (Ghosh et al. 2020), with weight sharing: a shared base and k cluster heads.

Each round a client picks the cluster whose head has the lowest loss on its train split
(:func:`fedmtl.server.grouping.choose_group`), trains base and that head jointly for
``local_epochs`` and releases both deltas; the server averages heads within clusters. The
personalised model is the client's cluster model. The same assignment rule is available to
fedmtl as ``grouping.method: ifca``."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class IFCA(Algorithm):
    name = "ifca"
    head_scope = "group"
    uses_groups = True
    learns_groups = True

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        heads = state.heads_for(group)
        base, new_heads, loss = train_joint(
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
        return self.update(
            data, group, base - state.base, diff(new_heads, heads), train_loss=loss
        ), None
