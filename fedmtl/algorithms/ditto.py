"""Ditto (Li et al. 2021): FedAvg for the global model w, plus a personal model v_c per client
that minimises f_c(v) + λ/2·‖v − w‖².

The personal model takes ``personal_epochs`` of proximal SGD: a gradient step on f_c, then
the exact proximal map of the λ term, v ← (v + ηλ·w)/(1 + ηλ). This is stable for every λ and
gives v = w in the limit λ → ∞ (the property the tests check)."""

from __future__ import annotations

import torch

from fedmtl.algorithms.base import Algorithm, ClientContext, copy_heads, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import load_weights, train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class Ditto(Algorithm):
    name = "ditto"

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg = ctx.cfg
        received = state.global_heads
        base, heads, loss = train_joint(
            ctx.model,
            state.base,
            received,
            data,
            ctx.tasks,
            cfg,
            ctx.generator,
            cfg.epochs,
            prox_mu=cfg.prox_mu,
        )
        if personal is None or personal.base is None:
            personal = PersonalState(copy_heads(received), state.base.clone())
        anchor = _anchor(ctx, state)  # the received global model w, per parameter
        shrink = 1.0 / (1.0 + cfg.lr * cfg.ditto_lambda)
        pull = cfg.lr * cfg.ditto_lambda * shrink

        @torch.no_grad()
        def proximal(model: torch.nn.Module) -> None:
            for p, w in zip(_params(model), anchor):
                p.mul_(shrink).add_(w, alpha=pull)

        v_base, v_heads, personal_loss = train_joint(
            ctx.model,
            personal.base,
            personal.heads,
            data,
            ctx.tasks,
            cfg,
            ctx.generator,
            cfg.personal_epochs,
            after_step=proximal,
        )
        update = self.update(
            data,
            group,
            base - state.base,
            diff(heads, received),
            train_loss=loss,
            personal_train_loss=personal_loss,
        )
        return update, PersonalState(v_heads, v_base)


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [*model.base.parameters(), *(p for h in model.heads.values() for p in h.parameters())]


def _anchor(ctx: ClientContext, state: ServerState) -> list[torch.Tensor]:
    """The received global weights, one tensor per parameter of :func:`_params`."""
    load_weights(ctx.model, state.base, state.global_heads)
    return [p.detach().clone() for p in _params(ctx.model)]
