"""Task heads: one small module per prediction target, on top of the shared base."""

from __future__ import annotations

from torch import nn


def build_head(in_features: int, kind: str, n_outputs: int) -> nn.Module:
    """A linear head: logits for classification (cross-entropy), one value for regression (MSE)."""
    if kind == "classification":
        if n_outputs < 2:
            raise ValueError(f"a classification head needs at least 2 classes, got {n_outputs}")
        return nn.Linear(in_features, n_outputs)
    if kind == "regression":
        return nn.Linear(in_features, 1)
    raise ValueError(
        f"task kind '{kind}' is not known; allowed values: 'classification', 'regression'"
    )
