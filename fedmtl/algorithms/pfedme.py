"""pFedMe (T. Dinh et al. 2020): personalisation with Moreau envelopes.

The client keeps a local copy w of the global model and a personalised model θ. For every
mini-batch it first takes ``pfedme_inner_steps`` gradient steps (learning rate
``pfedme_personal_lr``) on f(θ; batch) + λ/2·‖θ − w‖², approximating θ = prox_{f/λ}(w), then
moves w ← w − η·λ(w − θ) (η = ``training.lr``). It releases Δw; the server mixes
w ← w + β·mean Δw with β = ``server.lr`` (β = 1: plain averaging). The personalised model is θ.
"""

from __future__ import annotations

import torch

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import batches, load_weights, multitask_loss, read_heads
from fedmtl.state import ClientUpdate, PersonalState, ServerState, flat


class PFedMe(Algorithm):
    name = "pfedme"

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg, model = ctx.cfg, ctx.model
        load_weights(model, state.base, state.global_heads)
        model.train()
        params = list(model.parameters())  # θ, the personalised model
        local = [p.detach().clone() for p in params]  # w, the client's copy of the global model
        inner = torch.optim.SGD(params, lr=cfg.pfedme_personal_lr)
        lam = cfg.pfedme_lambda
        total, count = 0.0, 0
        for _ in range(cfg.epochs):
            total, count = 0.0, 0
            for idx in batches(data.n_train, cfg.batch_size, ctx.generator):
                xb = data.x_train[idx]
                yb = {k: v[idx] for k, v in data.y_train.items()}
                for _ in range(cfg.pfedme_inner_steps):
                    inner.zero_grad(set_to_none=True)
                    loss = multitask_loss(model(xb), yb, ctx.tasks)
                    prox = sum(((p - w) ** 2).sum() for p, w in zip(params, local))
                    (loss + 0.5 * lam * prox).backward()
                    inner.step()
                with torch.no_grad():
                    for p, w in zip(params, local):
                        w.sub_(cfg.lr * lam * (w - p))
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        theta_base, theta_heads = flat(model.base), read_heads(model, state.global_heads)
        # w back into the model, to read it in the state's vector layout
        with torch.no_grad():
            for p, w in zip(params, local):
                p.copy_(w)
        w_base, w_heads = flat(model.base), read_heads(model, state.global_heads)
        update = self.update(
            data,
            group,
            w_base - state.base,
            diff(w_heads, state.global_heads),
            train_loss=total / max(count, 1),
        )
        return update, PersonalState(theta_heads, theta_base)
