"""``fedmtl personalize``: cold start of a client that took no part in training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from cli.app import DEFAULT_TRACKING, VerboseOpt, _fail, app, console
from cli.registry import DEFAULT_MODEL, _load_predictor
from fedmtl import quiet

if TYPE_CHECKING:  # pandas is imported where a command needs it (fast --help)
    import pandas as pd


@app.command("personalize")
def personalize(
    support: Annotated[
        Path,
        typer.Argument(
            help="CSV or Parquet: the feature columns and the label columns; "
            "its labelled rows are the support set"
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="registered model URI (models:/name@alias, runs:/id/model) or a bundle file (.pt)",
        ),
    ] = DEFAULT_MODEL,
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", help="MLflow tracking store")
    ] = DEFAULT_TRACKING,
    client_id: Annotated[
        Optional[str],
        typer.Option(
            "--client-id",
            help="the new client's id (default: the file's client_id column, else 'new-client')",
        ),
    ] = None,
    predict: Annotated[
        Optional[Path],
        typer.Option(
            "--predict", help="CSV or Parquet of rows to predict (default: the support file's rows)"
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="predictions file (.csv or .parquet)")
    ] = Path("predictions.csv"),
    verbose: VerboseOpt = False,
) -> None:
    """Cold start: a model for a client that took no part in training.

    Picks the client's group by the loss of each group head on its labelled rows, fine-tunes
    its own head on them and predicts (no labelled rows: the global heads)."""
    quiet.configure(verbose)
    import pandas as pd

    from fedmtl.lifecycle.coldstart import encode_support
    from models.personalized import CLIENT_COLUMN, HEAD_COLUMN

    frame = _read_table(support, "support file")
    predictor = _load_predictor(model, tracking_uri)
    features, tasks = predictor.bundle.features, predictor.tasks
    client = client_id or _client_of(frame, CLIENT_COLUMN) or "new-client"
    _require_features(frame, features, support)
    labels = predictor.label_columns(frame)
    labelled = frame[frame[labels].notna().any(axis=1)] if labels else frame.iloc[:0]
    if predictor.is_known(client):
        console.print(
            f"[yellow]note:[/] client '{client}' is known to the model; personalising from "
            "the support rows anyway"
        )
    try:
        result = predictor.cold_start(client, labelled)
    except ValueError as exc:
        _fail(exc, 2)
    if result.source == "global":
        console.print(
            f"client [bold]{client}[/]: no labelled rows in '{support}' (label columns: "
            f"{', '.join(t.name for t in tasks)}): predicting with the [bold]global[/] heads"
        )
    else:
        cfg = predictor.coldstart_settings()
        start = (
            f"chose group [bold]{result.group}[/]"
            if result.group is not None
            else "started from the global heads (the model has no group heads)"
        )
        console.print(
            f"client [bold]{client}[/]: {result.n_labelled} labelled rows; {start}; fine-tuned its "
            f"head for {cfg.epochs} epochs (lr {cfg.lr}, prox_mu {cfg.prox_mu})"
        )
        if result.losses:
            table = Table(title="support loss of each group head", title_justify="left")
            table.add_column("group")
            table.add_column("loss", justify="right")
            for g, loss in sorted(result.losses.items(), key=lambda kv: kv[1]):
                table.add_row(g + (" (chosen)" if g == result.group else ""), f"{loss:.4f}")
            console.print(table)

    target = frame if predict is None else _read_table(predict, "predict file")
    if predict is not None:
        _require_features(target, features, predict)
    rows = target.assign(**{CLIENT_COLUMN: client})
    try:
        predicted = predictor.predict(rows, overrides={client: (result.source, result.heads)})
    except ValueError as exc:
        _fail(exc, 2)
    if predict is not None:
        try:
            truth = encode_support(target, tasks, client)
        except ValueError as exc:
            _fail(exc, 2)
        _print_scores(predicted, target, truth, tasks, predict)
    keep = [
        c
        for c in target.columns
        if c not in set(features) | {t.name for t in tasks} | {CLIENT_COLUMN}
    ]
    written = pd.concat(
        [
            target[keep].reset_index(drop=True),
            predicted.reset_index(drop=True).drop(columns=[HEAD_COLUMN]),
        ],
        axis=1,
    )
    written.insert(len(keep), CLIENT_COLUMN, client)
    written[HEAD_COLUMN] = predicted[HEAD_COLUMN].to_numpy()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".parquet":
            written.to_parquet(out, index=False)
        else:
            written.to_csv(out, index=False)
    except OSError as exc:
        _fail(exc, 2)
    console.print(f"wrote {len(written)} predictions to {out}")


def _read_table(path: Path, what: str) -> "pd.DataFrame":
    if not path.exists():
        _fail(FileNotFoundError(f"{what} '{path}' does not exist"), 2)
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - a file that is not a table: the user's input
        _fail(ValueError(f"{what} '{path}' could not be read: {exc}"), 2)
    _fail(ValueError(f"{what} '{path}' must be a .csv or .parquet file"), 2)
    raise AssertionError("unreachable")


def _require_features(frame: "pd.DataFrame", features: list[str], path: Path) -> None:
    missing = [c for c in features if c not in frame.columns]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        _fail(
            ValueError(
                f"'{path}' is missing feature column(s) {', '.join(missing[:10])}{more} "
                f"(the model needs {len(features)}: {features[0]} ... {features[-1]})"
            ),
            2,
        )


def _client_of(frame: "pd.DataFrame", column: str) -> str | None:
    if column in frame.columns:
        ids = frame[column].dropna().astype(str).unique()
        if len(ids) == 1:
            return str(ids[0])
        if len(ids) > 1:
            _fail(
                ValueError(
                    f"the support file holds {len(ids)} clients in '{column}'; "
                    "give one client's rows (or --client-id)"
                ),
                2,
            )
    return None


def _print_scores(predicted, target, truth, tasks, path: Path) -> None:
    import numpy as np

    from fedmtl.lifecycle.coldstart import present

    for task in tasks:
        mask = present(truth[task.name]).numpy()
        if task.name not in target.columns or not mask.any():
            continue
        if task.kind == "classification":
            index = {c: i for i, c in enumerate(task.classes)}
            pred = np.array([index[v] for v in predicted[task.name].tolist()])
            acc = float((pred[mask] == truth[task.name].numpy()[mask]).mean())
            console.print(
                f"accuracy on '{path}' ({task.name}, {int(mask.sum())} labelled rows): "
                f"[bold]{acc:.3f}[/]"
            )
        else:
            err_ = np.abs(
                predicted[task.name].to_numpy(dtype=float)[mask] - truth[task.name].numpy()[mask]
            )
            console.print(
                f"MAE on '{path}' ({task.name}, {int(mask.sum())} labelled rows): "
                f"[bold]{err_.mean():.4f}[/]"
            )
