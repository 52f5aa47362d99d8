"""The multi-task model: one shared base, one head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmtl.nn.bases import build_base
from fedmtl.nn.heads import build_head


class MultiTaskModel(nn.Module):
    """``base`` feeds every head in ``heads`` (a task name -> module mapping)."""

    def __init__(self, base: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.base = base
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.base(x)
        return {name: head(z) for name, head in self.heads.items()}


def build_model(
    model_cfg: Any,
    n_features: int,
    tasks: Sequence[Any],
    input_shape: Sequence[int] | None = None,
) -> MultiTaskModel:
    """Build from a ``ModelConfig``-like object and the manifest's tasks (``TaskSpec``s)."""
    base = build_base(
        model_cfg.base,
        n_features,
        model_cfg.hidden,
        model_cfg.dropout,
        input_shape=input_shape,
        cnn_channels=model_cfg.cnn_channels,
    )
    heads = {t.name: build_head(base.out_features, t.kind, t.n_outputs) for t in tasks}
    return MultiTaskModel(base, heads)
