"""The personalised model a run registers, as plain data: the shared base, the global and group
heads, the client → group routing, optionally the clients' personal heads, and the settings
needed to rebuild the torch model and to cold-start a new client.

Built by the training flow (``flows.training.make_bundle``), stored in the registry as
``bundle.pt`` (``torch.save`` of :meth:`PersonalizedBundle.to_dict`), served by
``models.personalized.PersonalizedPredictor`` and read back by a warm start
(:mod:`fedmtl.lifecycle.warmstart`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def default_coldstart() -> dict[str, Any]:
    """The cold-start settings of a bundle that does not name its own (``coldstart`` defaults)."""
    from fedmtl.config import ColdStartConfig

    return ColdStartConfig().model_dump(mode="json")


@dataclass
class PersonalizedBundle:
    """Everything needed to rebuild and route the model (plain tensors, lists and dicts)."""

    model_cfg: dict[str, Any]
    features: list[str]
    tasks: list[dict[str, Any]]  # TaskSpec fields: name, kind, classes
    input_shape: list[int] | None
    base: torch.Tensor
    global_heads: dict[str, torch.Tensor]
    group_heads: dict[str, dict[str, torch.Tensor]]
    client_groups: dict[str, str]
    personal_heads: dict[str, dict[str, torch.Tensor]]
    personal_bases: dict[str, torch.Tensor] = field(default_factory=dict)
    coldstart: dict[str, Any] = field(default_factory=default_coldstart)  # ColdStartConfig fields
    round: int = (
        0  # federated rounds trained so far (a warm start continues from it; 0: not recorded)
    )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PersonalizedBundle":
        return cls(**raw)
