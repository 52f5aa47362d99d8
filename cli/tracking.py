"""The tracking commands: ``fedmtl compare`` (runs side by side) and ``fedmtl ui``
(the MLflow UI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import DEFAULT_TRACKING, VerboseOpt, _fail, app, console
from fedmtl import quiet


@app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="two or more MLflow run ids or run names")],
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", help="MLflow tracking store")
    ] = DEFAULT_TRACKING,
    all_params: Annotated[
        bool, typer.Option("--all-params", help="show equal parameters too")
    ] = False,
    metric: Annotated[
        Optional[list[str]],
        typer.Option(
            "--metric",
            "-m",
            help="only metrics matching: a glob (personal/*) or a substring (accuracy); repeatable",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Runs side by side: the parameters that differ and each final metric (last round), the
    better value marked ✓ (higher accuracy/precision/recall/F1/gain/ARI, lower loss and time)."""
    quiet.configure(verbose)
    from fedmtl.eval.comparison import BEST_MARK
    from fedmtl.eval.comparison import compare as compare_runs

    if len(runs) < 2:
        _fail(ValueError(f"compare needs at least two runs, got {len(runs)}: {' '.join(runs)}"), 2)
    from tasks.runs import RunLookupError, fetch_runs  # the MLflow side lives in tasks/

    try:
        records = fetch_runs(runs, tracking_uri)
    except RunLookupError as exc:
        _fail(exc, 2)
    result = compare_runs(records, all_params=all_params, patterns=metric)
    for i, r in enumerate(result.runs, 1):
        console.print(f"run {i}: [bold]{r.name}[/]  {r.run_id}  {r.status}")
    sections = (
        ("parameter" if not all_params else "parameter (all)", result.params + result.tags),
        ("final metric (last round)", result.metrics),
    )
    for title, rows in sections:
        table = Table(title_justify="left")
        # names are never cut; on a narrow terminal the run columns fold instead
        table.add_column(
            title, no_wrap=True, min_width=max([len(title), *(len(row.key) for row in rows)])
        )
        for r in result.runs:
            table.add_column(r.name, justify="right", overflow="fold")
        for row in rows:
            table.add_row(
                row.key,
                *(f"[bold green]{c}[/]" if i in row.best else c for i, c in enumerate(row.cells())),
            )
        if rows:
            console.print(table)
        elif title.startswith("parameter"):
            console.print("parameters: all equal (--all-params shows them)")
        else:
            console.print("no final metrics" + (f" matching {', '.join(metric)}" if metric else ""))
    console.print(
        f"{BEST_MARK} better: higher accuracy, precision, recall, F1, gain, ARI; lower loss, "
        "error and time/*"
    )


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option("--port", "-p", help="port to listen on")] = 5000,
    host: Annotated[
        str, typer.Option("--host", help="interface to bind (127.0.0.1: this machine only)")
    ] = "127.0.0.1",
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", help="MLflow tracking store")
    ] = DEFAULT_TRACKING,
    allowed_hosts: Annotated[
        Optional[str],
        typer.Option(
            "--allowed-hosts",
            help="Host headers MLflow accepts beyond localhost and private IPs "
            "(MLflow 3's DNS-rebinding protection), e.g. mlflow.example.com",
        ),
    ] = None,
) -> None:
    """The MLflow UI on the tracking store: replaces this process with `mlflow ui`
    (Ctrl-C stops it)."""
    import os
    import shutil

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            _fail(
                FileNotFoundError(
                    f"tracking store '{tracking_uri}' does not exist (no file '{db}'): "
                    "train first, or pass --tracking-uri"
                ),
                2,
            )
    beside = Path(sys.executable).with_name("mlflow")
    exe = str(beside) if beside.is_file() else shutil.which("mlflow")
    if exe is None:
        _fail(FileNotFoundError("the `mlflow` command is not installed (pip install mlflow)"), 2)
    args = [exe, "ui", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port)]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(
        f"MLflow UI on [bold]http://{shown}:{port}[/] (store {tracking_uri}); Ctrl-C stops it"
    )
    sys.stdout.flush()
    # MLflow 3 also starts a GenAI job runner (a pool of worker processes) that runs and models
    # never use
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(exe, args)
