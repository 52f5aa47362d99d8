"""The personalised model as one servable object: base + a head per client, routed by client id.

Routing, for each row: the client's personal heads if the bundle has them, else its group's
heads if the client is known, else the global heads (the documented fallback for a client that
took no part in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call
from torch.nn.utils import vector_to_parameters

from models.multitask import build_model

CLIENT_COLUMN = "client_id"
HEAD_COLUMN = "head"  # which heads answered: personal | group | global


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PersonalizedBundle":
        return cls(**raw)


class PersonalizedPredictor:
    def __init__(self, bundle: PersonalizedBundle) -> None:
        self.bundle = bundle
        tasks = [SimpleNamespace(n_outputs=_n_outputs(t), **t) for t in bundle.tasks]
        self.model = build_model(
            SimpleNamespace(**bundle.model_cfg), len(bundle.features), tasks, bundle.input_shape
        )
        vector_to_parameters(bundle.base.clone(), self.model.base.parameters())
        self.model.eval()

    def heads_for(self, client: str) -> tuple[str, dict[str, torch.Tensor]]:
        """Which heads answer for ``client``: personal, else its group's, else global."""
        b = self.bundle
        if client in b.personal_heads:
            return "personal", b.personal_heads[client]
        group = b.client_groups.get(client)
        if group is not None and group in b.group_heads:
            return "group", b.group_heads[group]
        if client in b.personal_bases:  # a personal base with the global head (LG-FedAvg)
            return "personal", b.global_heads
        return "global", b.global_heads

    @torch.no_grad()
    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        b = self.bundle
        missing = [c for c in [CLIENT_COLUMN, *b.features] if c not in frame.columns]
        if missing:
            raise ValueError(f"input is missing column(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
        x_all = torch.tensor(frame[b.features].to_numpy(dtype=np.float32, copy=True))
        clients = frame[CLIENT_COLUMN].astype(str).to_numpy()
        out: dict[str, np.ndarray] = {}
        used = np.empty(len(frame), dtype=object)
        for task in b.tasks:
            out[task["name"]] = np.empty(len(frame), dtype=object if task["kind"] == "classification" else float)
        z_all = self.model.base(x_all) if len(frame) else None
        for client in pd.unique(clients):
            rows = np.flatnonzero(clients == client)
            source, heads = self.heads_for(client)
            used[rows] = source
            if client in b.personal_bases:  # methods that keep the whole model on the client
                base = self.model.base
                z = functional_call(base, unflatten(base, b.personal_bases[client]), (x_all[rows],))
            else:
                z = z_all[rows]
            for task in b.tasks:
                head = self.model.heads[task["name"]]
                y = functional_call(head, unflatten(head, heads[task["name"]]), (z,))
                if task["kind"] == "classification":
                    classes = np.asarray(task["classes"], dtype=object)
                    out[task["name"]][rows] = classes[y.argmax(dim=1).numpy()]
                else:
                    out[task["name"]][rows] = y.squeeze(-1).numpy()
        result = pd.DataFrame(index=frame.index)
        for task in b.tasks:
            values = out[task["name"]]
            if task["kind"] == "classification":
                values = pd.array(values.tolist(), dtype=_label_dtype(task["classes"]))
            result[task["name"]] = values
        result[HEAD_COLUMN] = used.astype(str)
        return result


def unflatten(module: torch.nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat parameter vector as the module's named parameters (for ``functional_call``)."""
    out, offset = {}, 0
    for name, p in module.named_parameters():
        out[name] = vector[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def _n_outputs(task: dict[str, Any]) -> int:
    return len(task["classes"]) if task["kind"] == "classification" else 1


def _label_dtype(classes: list[Any]) -> str:
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes):
        return "int64"
    if all(isinstance(c, (int, float, np.number)) for c in classes):
        return "float64"
    return "str"
