"""Shared bases (encoders): the part of the model every client helps learn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLPBase(nn.Module):
    """Fully connected encoder: Linear -> ReLU (-> Dropout) per hidden width."""

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNNBase(nn.Module):
    """A small CNN for image inputs given as flat vectors plus their shape (C, H, W)."""

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int], hidden: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model.base 'cnn' needs an image input shape (C, H, W), got {input_shape}"
            )
        self.input_shape = tuple(int(s) for s in input_shape)
        c_in, h, w = self.input_shape
        convs: list[nn.Module] = []
        for c in channels:
            convs += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU()]
            if min(h, w) >= 4:
                convs.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c_in = c
        self.convs = nn.Sequential(*convs)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * h * w, hidden), nn.ReLU())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.dropout(self.fc(self.convs(x)))


def build_base(
    kind: str,
    in_features: int,
    hidden: Sequence[int],
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
    cnn_channels: Sequence[int] = (16, 32),
) -> nn.Module:
    if kind == "mlp":
        return MLPBase(in_features, hidden, dropout)
    if kind == "cnn":
        if input_shape is None:
            raise ValueError("model.base 'cnn' needs image data (the manifest has no input_shape)")
        return SmallCNNBase(input_shape, cnn_channels, hidden[-1], dropout)
    raise ValueError(f"model.base '{kind}' is not known; allowed values: 'mlp', 'cnn'")
