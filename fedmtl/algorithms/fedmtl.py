"""fedmtl, this project's method: a shared base θ, one head per group φ_g, a personal head ψ_c.

Client round (docs/algorithm.md):

1. **personal step**: with the received θ frozen, train ψ_c for ``personal_epochs``, starting
   from φ_g (``personal_init: group``, a fine-tune anchored to the group) or from the stored ψ_c
   (``personal``), optionally pulled towards φ_g by ``personal_lambda``/2·‖ψ_c − φ_g‖².
   ψ_c never leaves the client.
2. **shared step**: from (θ, φ_g) train base and group head jointly for ``local_epochs``
   (FedProx's μ optional) and release Δθ and Δφ_g.

The server aggregates within groups first, then across groups (:mod:`fedmtl.aggregation`).
Groups come from a column or are learned (:mod:`fedmtl.grouping`).
"""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client import ClientData
from fedmtl.state import ClientUpdate, PersonalState, ServerState
from fedmtl.training import train_heads, train_joint


class FedMTL(Algorithm):
    name = "fedmtl"
    head_scope = "group"
    uses_groups = True

    def client_round(
        self, ctx: ClientContext, state: ServerState, data: ClientData, group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg = ctx.cfg
        group_heads = state.heads_for(group)
        keep = cfg.personal_init == "personal" and personal is not None and personal.heads
        start = personal.heads if keep else group_heads
        psi, personal_loss = train_heads(
            ctx.model, state.base, start, data, ctx.tasks, cfg, ctx.generator, cfg.personal_epochs,
            prox_mu=cfg.personal_lambda,
        )
        base, heads, loss = train_joint(
            ctx.model, state.base, group_heads, data, ctx.tasks, cfg, ctx.generator, cfg.epochs,
            prox_mu=cfg.prox_mu,
        )
        update = self.update(data, group, base - state.base, diff(heads, group_heads),
                             train_loss=loss, personal_train_loss=personal_loss)
        return update, PersonalState(psi)
