"""FedAvg (McMahan et al. 2017): one global model, trained jointly on every client.

With ``algorithm.prox_mu`` > 0 the local objective gains FedProx's μ/2·‖w − w_r‖² (Li et al.
2020); with ``server.optimizer`` fedadam/fedyogi the server step is Reddi et al.'s (2021).
The personalised model is the global model itself.
"""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client import ClientData
from fedmtl.state import ClientUpdate, PersonalState, ServerState
from fedmtl.training import train_joint


class FedAvg(Algorithm):
    name = "fedavg"

    def client_round(
        self, ctx: ClientContext, state: ServerState, data: ClientData, group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        base, heads, loss = train_joint(
            ctx.model, state.base, state.global_heads, data, ctx.tasks, ctx.cfg, ctx.generator,
            ctx.cfg.epochs, prox_mu=ctx.cfg.prox_mu,
        )
        return self.update(data, group, base - state.base, diff(heads, state.global_heads),
                           train_loss=loss), None
