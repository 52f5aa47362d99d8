"""FedBABU (Oh, Kim & Yun, ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated
Image Classification"): federated training of the body only, the head fixed at its random
initialisation, then fine-tuning for personalisation.

Each round the client trains the base for ``local_epochs`` with the received head frozen and
releases Δθ only; the server never updates the head, so every client trains towards the same
fixed, randomly initialised head (the paper's point: a frozen head makes the shared
representation, not the head, absorb the federation's knowledge). The personalised model is
the global model with both base and head fine-tuned on the client's train split for
``personal_epochs`` (the paper fine-tunes the whole model; its default 5 epochs is the
harness's ``personal_epochs``)."""

from __future__ import annotations

from fedmtl.algorithms.base import ClientContext
from fedmtl.algorithms.fedavg_ft import FedAvgFT
from fedmtl.client.data import ClientData
from fedmtl.client.training import train_joint
from fedmtl.state import ClientUpdate, PersonalState, ServerState


class FedBABU(FedAvgFT):
    """FedAvg-FT's personalisation (the global model fine-tuned, base and head), after a
    federated training that never moves the head."""

    name = "fedbabu"
    shares_heads = False  # the head is never aggregated: it stays at its initial values
    batchable = False  # the batched shared step trains heads too

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState | None]:
        base, _, loss = train_joint(
            ctx.model,
            state.base,
            state.global_heads,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
            train_head=False,
            prox_mu=ctx.cfg.prox_mu,
        )
        return self.update(data, group, base - state.base, {}, train_loss=loss), None
