"""Explicit federated state: what the server holds, what a client sends back.

Parameters travel as flat float32 vectors (``torch.nn.utils.parameters_to_vector`` order of the
module they belong to), so aggregation, clipping and masking are plain tensor arithmetic.
The server state never holds a personal head: those live in the :class:`~fedmtl.store.ClientStore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

Vector = torch.Tensor
Heads = dict[str, Vector]  # task name -> head parameters


def flat(module: nn.Module) -> Vector:
    return parameters_to_vector(module.parameters()).detach().clone()


def assign(module: nn.Module, vector: Vector) -> None:
    """Copy ``vector`` into the module's parameters. (``vector_to_parameters`` would make the
    parameters views of ``vector``, so training would write into the caller's state.)"""
    params = list(module.parameters())
    expected = sum(p.numel() for p in params)
    if vector.numel() != expected:
        raise ValueError(f"parameter vector has {vector.numel()} values, the module needs {expected}")
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view_as(p))
            offset += n


@dataclass
class ServerState:
    """Shared base θ, one head per (group, task) φ_g, the global head φ₀ per task, the round."""

    round: int
    base: Vector
    group_heads: dict[str, Heads]
    global_heads: Heads

    def heads_for(self, group: str) -> Heads:
        """The heads a client of ``group`` starts from: its group's, else the global fallback."""
        return self.group_heads.get(group, self.global_heads)

    def to_dict(self) -> dict:
        return {
            "round": self.round,
            "base": self.base,
            "group_heads": self.group_heads,
            "global_heads": self.global_heads,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "ServerState":
        return cls(raw["round"], raw["base"], raw["group_heads"], raw["global_heads"])


@dataclass
class ClientUpdate:
    """What a client releases after local training: deltas, its sample count, train metrics."""

    client: str
    group: str
    n_samples: int
    delta_base: Vector
    delta_heads: Heads
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupAggregate:
    """A group's sample-weighted mean update and the mass behind it."""

    group: str
    n_clients: int
    n_samples: int
    delta_base: Vector
    delta_heads: Heads
    clients: list[str] = field(default_factory=list)


def initial_state(model: nn.Module, groups: list[str]) -> ServerState:
    """Round 0: the model's initial weights, every group head a copy of the global head."""
    base = flat(model.base)
    global_heads = {t: flat(h) for t, h in model.heads.items()}
    group_heads = {g: {t: v.clone() for t, v in global_heads.items()} for g in groups}
    return ServerState(0, base, group_heads, global_heads)
