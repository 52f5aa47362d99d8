"""FedAvg + local fine-tuning: FedAvg's training; each client's personalised model is the
current global model fine-tuned (base and heads) on its own train split for
``personal_epochs`` (the classic baseline of Wang et al. 2019, "Federated evaluation of
on-device personalization")."""

from __future__ import annotations

from fedmtl.algorithms.base import ClientContext
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import Heads, PersonalState, ServerState, Vector


class FedAvgFT(FedAvg):
    name = "fedavg-ft"

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, PersonalState]:
        base, heads, _ = train_joint(
            ctx.model,
            state.base,
            state.global_heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.personal_epochs,
        )
        return base, heads, PersonalState(heads, base)
