"""FedAvg (McMahan et al. 2017): one global model, trained jointly on every client.

With ``algorithm.prox_mu`` > 0 the local objective gains FedProx's μ/2·‖w − w_r‖² (Li et al.
2020); with ``server.optimizer`` fedadam/fedyogi the server step is Reddi et al.'s (2021).
The personalised model is the global model itself.
"""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm, ClientContext, SharedStart
from fedmtl.client.data import ClientData
from fedmtl.client.training import LocalConfig
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class FedAvg(Algorithm):
    name = "fedavg"
    batchable = True  # the shared step from (θ, φ₀); also FedAvg-FT's and FedProx's (prox_mu)

    def shared_start(
        self, cfg: LocalConfig, state: ServerState, group: str, personal: PersonalState | None
    ) -> SharedStart:
        return SharedStart(state.base, state.global_heads, cfg.prox_mu)

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        return self.shared_round(ctx, state, data, group, personal)
