"""The server state and a client update as bytes: tensors and plain values only, written with
``torch.save`` and read back with ``weights_only=True`` (no code runs on load)."""

from __future__ import annotations

import io

import torch

from fedmtl.state import ClientUpdate, ServerState


def _dump(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _load(blob: bytes) -> dict:
    value = torch.load(io.BytesIO(blob), weights_only=True)
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {type(value).__name__}")
    return value


def encode_state(state: ServerState) -> bytes:
    return _dump(state.to_dict())


def decode_state(blob: bytes) -> ServerState:
    return ServerState.from_dict(_load(blob))


def encode_update(update: ClientUpdate) -> bytes:
    return _dump(
        {
            "client": update.client,
            "group": update.group,
            "n_samples": int(update.n_samples),
            "delta_base": update.delta_base,
            "delta_heads": dict(update.delta_heads),
            "metrics": {k: float(v) for k, v in update.metrics.items()},
            "task_samples": update.task_samples,
        }
    )


def decode_update(blob: bytes) -> ClientUpdate:
    raw = _load(blob)
    return ClientUpdate(
        client=str(raw["client"]),
        group=raw["group"],
        n_samples=int(raw["n_samples"]),
        delta_base=raw["delta_base"],
        delta_heads=dict(raw["delta_heads"]),
        metrics=dict(raw["metrics"]),
        task_samples=_task_samples(raw.get("task_samples")),
    )


def _task_samples(raw: object) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"an update's task_samples must be a mapping, got {type(raw).__name__}")
    return {str(t): int(n) for t, n in raw.items()}
