"""Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The server treats the merged client update Δ as a pseudo-gradient and steps

- **FedAvg**: x ← x + η Δ (η = 1 is McMahan et al.'s plain averaging);
- **FedAdam**: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; x ← x + η m / (√v + τ);
- **FedYogi**: as FedAdam but v ← v − (1−β₂)Δ² sign(v − Δ²).

These are the paper's updates exactly (no bias correction, v₀ = τ²), which ``torch.optim.Adam``
does not reproduce and torch has no Yogi; hence the few lines here. Moments live in the
:class:`~fedmtl.state.ServerState` (``optimizer``), keyed by the part they belong to, so a
checkpoint of the state is a checkpoint of the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmtl.state import Vector

OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"server.optimizer '{self.name}' is not known; allowed values: {OPTIMIZERS}"
            )

    def step(self, key: str, x: Vector, delta: Vector, moments: dict[str, Vector]) -> Vector:
        """The next value of part ``key``; updates ``moments`` (a new dict entry per key)."""
        if self.name == "fedavg":
            return x + self.lr * delta
        m = moments.get(f"{key}/m", torch.zeros_like(x))
        v = moments.get(f"{key}/v", torch.full_like(x, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        sq = delta * delta
        if self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        else:  # fedyogi
            v = v - (1 - self.beta2) * sq * torch.sign(v - sq)
        moments[f"{key}/m"], moments[f"{key}/v"] = m, v
        return x + self.lr * m / (v.sqrt() + self.tau)

    @classmethod
    def from_config(cls, server) -> "ServerOptimizer":  # a fedmtl.config.ServerConfig
        return cls(server.optimizer, server.lr, server.beta1, server.beta2, server.tau)
