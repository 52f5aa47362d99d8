"""fedmtl, this project's method: a shared base θ, one head per group φ_g, a personal head ψ_c.

Client round (docs/algorithm.md):

- **shared step**: from the received (θ, φ_g) train base and group head jointly for
  ``local_epochs`` (FedProx's μ optional) and release Δθ and Δφ_g. The server aggregates
  within groups first, then across groups (:mod:`fedmtl.server.aggregation`); groups come from a
  column or are learned (:mod:`fedmtl.server.grouping`).
- **personal step**, whenever the client receives a new model: with θ frozen, fit ψ_c for
  ``personal_epochs`` starting from φ_g (a fine-tune anchored to the group, optionally
  pulled towards it by ``personal_lambda``/2·‖ψ_c − φ_g‖²), or exactly
  (``personal_fit: map``, :mod:`fedmtl.client.personal`): by default per task the group head,
  the group head with the client's own output bias or the personal head at ``personal_lambda``,
  each step kept where the approximate leave-one-out loss on the client's rows shows it better
  by more than 1.5 standard errors (``personal_lambda_search: loo``); or λ fixed (``off``) or
  chosen by k-fold cross-validation (``cv``). ψ_c is fitted on the base it will be used with,
  and never leaves the client.
"""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, SharedStart
from fedmtl.client.data import ClientData
from fedmtl.client.personal import fit_personal_heads
from fedmtl.client.training import LocalConfig, train_heads
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector


class FedMTL(Algorithm):
    name = "fedmtl"
    head_scope = "group"
    uses_groups = True
    batchable = (
        True  # the client round is the shared step from (θ, φ_g); ψ_c is fitted in personalized
    )

    def shared_start(
        self, cfg: LocalConfig, state: ServerState, group: str, personal: PersonalState | None
    ) -> SharedStart:
        return SharedStart(state.base, state.heads_for(group), cfg.prox_mu)

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        return self.shared_round(ctx, state, data, group, personal)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, PersonalState]:
        if ctx.cfg.personal_fit == "map":
            psi, _, _ = fit_personal_heads(
                ctx.model,
                state.base,
                state.heads_for(group),
                data,
                ctx.tasks,
                ctx.cfg.personal_lambda,
                ctx.cfg.personal_lambda_search,
                ctx.cfg.personal_lambda_grid,
            )
        else:
            psi, _ = train_heads(
                ctx.model,
                state.base,
                state.heads_for(group),
                data,
                ctx.tasks,
                ctx.cfg,
                ctx.generator,
                ctx.cfg.personal_epochs,
                prox_mu=ctx.cfg.personal_lambda,
            )
        return state.base, psi, PersonalState(psi)
