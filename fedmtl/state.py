"""Explicit federated state: what the server holds, what a client sends back.

Parameters travel as flat float32 vectors (``torch.nn.utils.parameters_to_vector`` order of the
module they belong to), so aggregation, clipping and masking are plain tensor arithmetic.
The server state never holds a personal head: those live in the
:class:`~fedmtl.client.store.ClientStore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

Vector = torch.Tensor
Heads = dict[str, Vector]  # task name -> head parameters


def flat(module: nn.Module) -> Vector:
    params = list(module.parameters())
    if not params:  # e.g. the identity base of multinomial logistic regression
        return torch.zeros(0)
    return parameters_to_vector(params).detach().clone()


def assign(module: nn.Module, vector: Vector) -> None:
    """Copy ``vector`` into the module's parameters. (``vector_to_parameters`` would make the
    parameters views of ``vector``, so training would write into the caller's state.)"""
    params = list(module.parameters())
    expected = sum(p.numel() for p in params)
    if vector.numel() != expected:
        raise ValueError(
            f"parameter vector has {vector.numel()} values, the module needs {expected}"
        )
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view_as(p))
            offset += n


@dataclass
class ServerState:
    """Shared base θ, one head per (group, task) φ_g, the global head φ₀ per task, the round,
    the client → group assignment (given by a column, or learned), the server optimiser's
    moments (FedAdam/FedYogi; empty for FedAvg) and the privacy mechanisms' own server state
    (adaptive clipping's C, DP-SGD's table of client ε; empty without them)."""

    round: int
    base: Vector
    group_heads: dict[str, Heads]
    global_heads: Heads
    assignment: dict[str, str] = field(default_factory=dict)
    optimizer: dict[str, Vector] = field(default_factory=dict)
    privacy: dict[str, Vector] = field(default_factory=dict)

    def heads_for(self, group: str | None) -> Heads:
        """The heads a client of ``group`` starts from: its group's, else the global fallback."""
        if group is None:
            return self.global_heads
        return self.group_heads.get(group, self.global_heads)

    def to_dict(self) -> dict:
        return {
            "round": self.round,
            "base": self.base,
            "group_heads": self.group_heads,
            "global_heads": self.global_heads,
            "assignment": self.assignment,
            "optimizer": self.optimizer,
            "privacy": self.privacy,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "ServerState":
        optimizer = dict(raw.get("optimizer", {}))
        privacy = dict(raw.get("privacy", {}))
        for key in [
            k for k in optimizer if k.startswith("privacy/")
        ]:  # where earlier checkpoints kept it
            privacy.setdefault(key, optimizer.pop(key))
        return cls(
            raw["round"],
            raw["base"],
            raw["group_heads"],
            raw["global_heads"],
            dict(raw.get("assignment", {})),
            optimizer,
            privacy,
        )


@dataclass
class PersonalState:
    """What a client keeps and never releases: personal heads ψ_c and, for methods that keep
    the whole model or the representation local (local-only, LG-FedAvg, Ditto, pFedMe), a
    personal base θ_c; ``extra``: any other named vectors a method keeps on the client (FedALA's
    aggregation weights, FedDBE's representation bias), never released nor bundled."""

    heads: Heads
    base: Vector | None = None
    extra: dict[str, Vector] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"heads": self.heads, "base": self.base, "extra": self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> "PersonalState":
        return cls(dict(raw["heads"]), raw.get("base"), dict(raw.get("extra") or {}))


class FailureKind(str, Enum):
    """Why a client was lost to a round, which decides what the round does about it."""

    ERROR = "error"  # local training raised: worth a retry
    TIMEOUT = "timeout"  # cut off by training.client_timeout: it was given its time
    REJECTED = "rejected"  # its update was refused (non-finite, outsized): it would be again
    BUDGET_SPENT = "budget_spent"  # its DP-SGD budget is spent: it sits the round out
    PARTITION = "partition"  # its partition cannot be used: like a quarantined client, it sits out


@dataclass(frozen=True)
class ClientFailure:
    """A client lost to a round: the kind (what the round does about it), the exception's name
    and its message. An exception class names its kind in ``failure_kind`` (default: an error
    worth a retry). ``str()`` gives ``"ExceptionName: message"``, as the round reports show."""

    kind: FailureKind
    error: str
    message: str

    @classmethod
    def of(cls, exc: BaseException, note: str = "") -> "ClientFailure":
        kind = FailureKind(getattr(exc, "failure_kind", FailureKind.ERROR))
        return cls(kind, type(exc).__name__, f"{exc}{note}")

    @property
    def retryable(self) -> bool:
        return self.kind is FailureKind.ERROR

    def __str__(self) -> str:
        return f"{self.error}: {self.message}"


@dataclass
class ClientUpdate:
    """What a client releases after local training: deltas of the parts its method shares
    (``delta_base`` is None and ``delta_heads`` empty for parts kept local), its sample count,
    the group it trained for, and train metrics."""

    client: str
    group: str
    n_samples: int
    delta_base: Vector | None
    delta_heads: Heads
    metrics: dict[str, float] = field(default_factory=dict)
    #: train rows holding each task's label, where some lack it (optional tasks); None: all do.
    #: A head is averaged with these weights, so a client without a task's labels leaves it be.
    task_samples: dict[str, int] | None = None

    def samples_for(self, task: str) -> int:
        """The rows behind this update's head of ``task``."""
        if self.task_samples is None:
            return self.n_samples
        return self.task_samples.get(task, self.n_samples)


@dataclass
class GroupAggregate:
    """A group's sample-weighted mean update and the mass behind it. ``weight``: a public
    weight for the merge across groups that replaces ``grouping.weighting`` (DP: the group's
    expected number of clients); ``pooled``: a base-only release of several small groups
    (:mod:`fedmtl.privacy.aggregation`), which updates no group head and assigns no group."""

    group: str
    n_clients: int
    n_samples: int
    delta_base: Vector | None
    delta_heads: Heads
    clients: list[str] = field(default_factory=list)
    weight: float | None = None
    pooled: bool = False
    #: per task, the members' train rows holding its label (None: n_samples for every task)
    task_samples: dict[str, int] | None = None


def initial_state(
    model: nn.Module,
    groups: list[str],
    assignment: dict[str, str] | None = None,
    distinct_heads: list[Heads] | None = None,
) -> ServerState:
    """Round 0: the model's initial weights; every group head a copy of the global head, or,
    for learned groups (IFCA), its own random initialisation from ``distinct_heads``."""
    base = flat(model.base)
    global_heads = {t: flat(h) for t, h in model.heads.items()}
    if distinct_heads is not None:
        group_heads = {g: distinct_heads[i] for i, g in enumerate(groups)}
    else:
        group_heads = {g: {t: v.clone() for t, v in global_heads.items()} for g in groups}
    return ServerState(0, base, group_heads, global_heads, dict(assignment or {}))
