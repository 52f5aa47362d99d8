"""Score a personalised model as it is served: each client's held-out rows go through the
model's own routing (personal, group or global heads), and the metrics are computed per client.

This is what ``fedmtl evaluate`` prints and what the promotion gates compare: the champion and
the challenger answer the same rows, the way they would answer them in production.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from fedmtl.client.data import encode_labels
from fedmtl.data import load_partition
from fedmtl.data.manifest import TaskSpec
from fedmtl.eval.metrics import classification_metrics, regression_metrics
from models.personalized import CLIENT_COLUMN, HEAD_COLUMN, PersonalizedPredictor


def score_clients(
    predictor: PersonalizedPredictor, test_rows: Iterable[tuple[str, pd.DataFrame]]
) -> pd.DataFrame:
    """One record per (client, task): ``client``, ``task``, ``n_test``, ``head`` (which heads
    answered) and the task's metrics (accuracy, precision, recall, f1; or mae, rmse).

    ``test_rows``: (client id, that client's held-out rows with the feature and label columns).
    Rows whose label is missing do not count for that task."""
    tasks = [
        TaskSpec(name=t["name"], kind=t["kind"], classes=list(t["classes"]))
        for t in predictor.bundle.tasks
    ]
    records: list[dict] = []
    for client, frame in test_rows:
        if frame.empty:
            continue
        missing = [t.name for t in tasks if t.name not in frame.columns]
        if missing:
            raise ValueError(f"client '{client}': held-out rows have no label column(s) {missing}")
        predicted = predictor.predict(
            frame.assign(**{CLIENT_COLUMN: client}).drop(columns=[t.name for t in tasks])
        )
        head = str(predicted[HEAD_COLUMN].iloc[0])
        for task in tasks:
            labelled = frame[task.name].notna().to_numpy()
            if not labelled.any():
                continue
            truth = encode_labels(frame[task.name][labelled], task, client).numpy()
            values = predicted[task.name][labelled]
            if task.kind == "classification":
                pred = encode_labels(values, task, client).numpy()
                metrics = classification_metrics(truth, pred)
            else:
                metrics = regression_metrics(truth, values.to_numpy(dtype=np.float64))
            records.append(
                {
                    "client": client,
                    "task": task.name,
                    "n_test": int(labelled.sum()),
                    "head": head,
                    **metrics,
                }
            )
    return pd.DataFrame.from_records(records)


def held_out_rows(
    partitions_dir: str, clients: Iterable[str]
) -> Iterable[tuple[str, pd.DataFrame]]:
    """(client, its held-out split) for each client, read from its partition file."""
    for client in clients:
        frame = load_partition(partitions_dir, client)
        yield client, frame[frame["split"] == "test"].reset_index(drop=True)
