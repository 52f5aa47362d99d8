"""The personalised model as one servable object: base + a head per client, routed by client id.

Routing, for each row: the client's personal heads if the bundle has them, else its group's
heads if the client is known, else, for a client that took no part in training, a cold start:
when its rows carry labels (the task's label column present and not null), those rows are its
support set, it picks its group by the loss of each group head on them and fine-tunes its own
head from it (:func:`fedmtl.lifecycle.coldstart.personalize`, settings in the bundle's
``coldstart``), and all its rows are predicted with that head (``head`` = "cold-start"); without
labels, the global heads. A cold start is not remembered: send the labelled rows with every
request.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call
from torch.nn.utils import vector_to_parameters

from fedmtl.bundle import PersonalizedBundle  # noqa: F401 - re-exported: where the served model is read
from fedmtl.client.training import client_seed
from fedmtl.lifecycle.coldstart import ColdStart, ColdStartSettings, encode_support, personalize
from fedmtl.nn import build_model

CLIENT_COLUMN = "client_id"
HEAD_COLUMN = "head"  # which heads answered: personal | group | cold-start | global


class PersonalizedPredictor:
    def __init__(self, bundle: PersonalizedBundle) -> None:
        self.bundle = bundle
        self.tasks = [
            SimpleNamespace(n_outputs=_n_outputs(t), **{"optional": False, **t})
            for t in bundle.tasks
        ]
        self.model = build_model(
            SimpleNamespace(**bundle.model_cfg),
            len(bundle.features),
            self.tasks,
            bundle.input_shape,
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

    def is_known(self, client: str) -> bool:
        """Whether the routing has heads of its own for ``client`` (personal or its group's)."""
        b = self.bundle
        return (
            client in b.personal_heads
            or client in b.personal_bases
            or (b.client_groups.get(client) in b.group_heads)
        )

    def label_columns(self, frame: pd.DataFrame) -> list[str]:
        """The tasks' label columns that ``frame`` has."""
        return [t["name"] for t in self.bundle.tasks if t["name"] in frame.columns]

    def cold_start(self, client: str, frame: pd.DataFrame) -> ColdStart:
        """Personalise for ``client`` (unknown to the bundle) on the labelled rows of ``frame``
        (features and label columns; rows without any label are ignored; none: global heads).
        Raises ``ValueError`` for a missing feature column or a label that is not a declared
        class."""
        b = self.bundle
        missing = [c for c in b.features if c not in frame.columns]
        if missing:
            raise ValueError(
                "input is missing feature column(s) "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        y = encode_support(frame, self.tasks, client)
        x = torch.tensor(feature_matrix(frame, b.features))
        cfg = self.coldstart_settings()
        seed = client_seed(cfg.seed, 0, client, "cold-start")
        model = copy.deepcopy(self.model)  # training writes into the module: never the shared one
        return personalize(
            model,
            b.base,
            b.group_heads,
            b.global_heads,
            x,
            y,
            self.tasks,
            cfg,
            seed=seed,
            client=client,
        )

    def coldstart_settings(self) -> ColdStartSettings:
        """The bundle's cold-start settings (the ``coldstart`` defaults where it names none)."""
        return ColdStartSettings.from_any(self.bundle.coldstart or {})

    @torch.no_grad()
    def predict(
        self,
        frame: pd.DataFrame,
        overrides: dict[str, tuple[str, dict[str, torch.Tensor]]] | None = None,
    ) -> pd.DataFrame:
        """One column per task (the predicted label or value) and ``head`` (which heads answered).
        ``overrides``: client -> (source, heads) to answer with instead of the routing (e.g. the
        result of :meth:`cold_start`)."""
        b = self.bundle
        missing = [c for c in [CLIENT_COLUMN, *b.features] if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input is missing column(s) {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        x_all = torch.tensor(feature_matrix(frame, b.features))
        clients = frame[CLIENT_COLUMN].astype(str).to_numpy()
        check_cold_start_load(frame, clients, self.label_columns(frame), self.is_known)
        out: dict[str, np.ndarray] = {}
        used = np.empty(len(frame), dtype=object)
        for task in b.tasks:
            out[task["name"]] = np.empty(
                len(frame), dtype=object if task["kind"] == "classification" else float
            )
        z_all = self.model.base(x_all) if len(frame) else None
        labels = self.label_columns(frame)
        for client in pd.unique(clients):
            rows = np.flatnonzero(clients == client)
            source, heads = self.heads_for(client)
            if overrides and client in overrides:
                source, heads = overrides[client]
            elif source == "global" and labels:  # a client the bundle does not know
                support = frame.iloc[rows]
                support = support[support[labels].notna().any(axis=1)]
                if len(support):
                    done = self.cold_start(client, support)
                    source, heads = done.source, done.heads
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


#: What one request may ask the model to fit: cold-start clients (an unknown client id sent with
#: labelled rows) and labelled rows for each. Each fit is a few epochs on the server's CPU, so
#: an unbounded request would let one caller occupy the scoring server; larger support sets
#: belong in `fedmtl personalize`, run where the client's data is.
MAX_COLD_START_CLIENTS = 16
MAX_SUPPORT_ROWS = 10_000


def feature_matrix(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """The feature columns as float32; ``ValueError`` naming the column(s) and a row for values
    that are not numbers or not finite (NaN, inf, or beyond float32), which would otherwise be
    answered with a meaningless prediction."""
    try:
        x = frame[features].to_numpy(dtype=np.float64, copy=True)
    except (TypeError, ValueError):
        odd = [
            c
            for c in features
            if pd.to_numeric(frame[c], errors="coerce").isna().any() and not frame[c].isna().all()
        ]
        raise ValueError(
            f"feature column(s) {odd[:5] or features[:5]} hold values that are not numbers"
        ) from None
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        rows, cols = np.nonzero(bad)
        named = sorted({features[c] for c in cols})
        raise ValueError(
            f"feature column(s) {named[:5]}{'...' if len(named) > 5 else ''} hold {int(bad.sum())} "
            f"missing, infinite or out-of-range value(s) (first at row {int(rows[0])}); "
            "send finite numbers"
        )
    return x32


def check_cold_start_load(
    frame: pd.DataFrame, clients: np.ndarray, labels: list[str], is_known
) -> None:
    """Refuse (``ValueError``) a request that asks for more cold-start fits than
    :data:`MAX_COLD_START_CLIENTS`, or more than :data:`MAX_SUPPORT_ROWS` labelled rows for one."""
    if not labels or not len(frame):
        return
    labelled = frame[labels].notna().any(axis=1).to_numpy()
    counts = pd.Series(clients[labelled]).value_counts()
    unknown = {c: int(n) for c, n in counts.items() if not is_known(c)}
    if len(unknown) > MAX_COLD_START_CLIENTS:
        raise ValueError(
            f"the request sends labelled rows for {len(unknown)} unknown clients; one request "
            f"fits at most {MAX_COLD_START_CLIENTS} (send fewer, or run `fedmtl personalize`)"
        )
    big = {c: n for c, n in unknown.items() if n > MAX_SUPPORT_ROWS}
    if big:
        client, n = next(iter(big.items()))
        raise ValueError(
            f"client '{client}': {n} labelled rows in one request; a cold start fits on at most "
            f"{MAX_SUPPORT_ROWS} (run `fedmtl personalize` for a larger support set)"
        )


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
