"""The training commands: ``fedmtl train``, ``fedmtl run`` (the whole pipeline) and
``fedmtl report``, with the rounds progress bar and the run summary they print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import (
    ParamsOpt,
    SetOpt,
    VerboseOpt,
    _check_tracking,
    _config,
    _fail,
    _own_errors,
    app,
    console,
)
from fedmtl import quiet
from fedmtl.config import Config


class RoundsBar:
    """A rich progress bar over rounds and, within a round, the clients that finished."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            disable=not console.is_terminal,
            transient=False,
        )
        self.rounds = self.clients = None

    def __enter__(self) -> "RoundsBar":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start(self, rounds: int) -> None:
        self.rounds = self.bar.add_task("rounds", total=rounds, note="")
        self.clients = self.bar.add_task("  clients", total=None, note="")

    def round_started(self, round_: int, clients: int) -> None:
        self.bar.reset(
            self.clients, total=clients, description=f"  round {round_}: clients", note=""
        )

    def client_done(self, n: int = 1) -> None:
        self.bar.advance(self.clients, n)

    def round_done(self, round_: int, headline: str) -> None:
        self.bar.update(self.rounds, advance=1, note=headline)

    def note(self, message: str) -> None:
        self.bar.console.print(message)


def _train(cfg: Config, whole_pipeline: bool, verbose: bool = False, resume: bool = False) -> dict:
    _check_tracking(cfg.tracking.tracking_uri)
    from flows.startup import ApiStart, loading, warm_up

    api = ApiStart().start()  # the ephemeral Prefect API boots while the rest loads
    with loading():
        from flows import progress
        from flows.runtime import run_and_settle

        _own_errors(verbose)

        from flows.runners import RunnerError, with_runner, worker_environment

        warm_up(cfg, data=not whole_pipeline)

        if whole_pipeline:
            from flows.pipeline import pipeline as flow_fn
        else:
            from flows.training import federated_training

            try:
                flow_fn = with_runner(federated_training, cfg)
            except RunnerError as exc:
                _fail(exc, 2)
    from flows.interrupt import EXIT_INTERRUPTED, Interrupted, stopping_safely

    resume_hint = "resume with: fedmtl train --resume"
    try:
        with (
            api.settings(),
            RoundsBar() as bar,
            progress.reporting(bar),
            worker_environment(cfg.runner),
            stopping_safely(
                bar.note, last_words=f"Checkpoints on disk are complete; {resume_hint}"
            ),
        ):
            extra = {"resume": True} if resume else {}
            return run_and_settle(flow_fn, cfg.model_dump(mode="json"), **extra)
    except Interrupted as exc:  # stopped at a safe point; the MLflow run is KILLED
        console.print(
            f"interrupted at round {exc.round}; {resume_hint} (with the same settings)",
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc, 2)
    except Exception as exc:  # noqa: BLE001 - the flow's failure, reported without a traceback
        _fail(exc, 1)
    raise AssertionError("unreachable")


DaskOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dask-address",
        help="run the client tasks on this Dask scheduler (runner.kind=dask, runner.dask_address)",
    ),
]


def _with_dask(set_: list[str] | None, address: str | None) -> list[str] | None:
    return (
        [*(set_ or []), "runner.kind=dask", f"runner.dask_address={address}"] if address else set_
    )


ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="continue the newest interrupted run with the same settings and data after its last "
        "complete round (its checkpoint), in the same MLflow run",
    ),
]


@app.command("train")
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    dask_address: DaskOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Federated training on the validated partitions (the DVC train stage)."""
    cfg = _config(params, _with_dask(set_, dask_address))
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=False, verbose=verbose, resume=resume)
    print_summary(result)


@app.command("run")
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    dask_address: DaskOpt = None,
) -> None:
    """The whole pipeline in one Prefect flow run: prepare, partition, validate, train."""
    cfg = _config(params, _with_dask(set_, dask_address))
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=True, verbose=verbose)
    print_summary(result)


@app.command("report")
def report(metrics_file: Annotated[Path, typer.Argument()] = Path("metrics.json")) -> None:
    """Print the summary of the last training run from its DVC metrics file."""
    if not metrics_file.exists():
        _fail(
            FileNotFoundError(
                f"'{metrics_file}' does not exist: run `make run` or `fedmtl run` first"
            ),
            2,
        )
    print_summary(json.loads(metrics_file.read_text()))


def print_summary(result: dict) -> None:
    basis = result.get("evaluation", "mean over clients")
    table = Table(
        title=f"fedmtl: final round on the clients' held-out splits, {basis}", title_justify="left"
    )
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("worst-10 % acc.", justify="right")
    for variant, label in (
        ("global", "global (shared head)"),
        ("group", "group heads"),
        ("personal", "personalised"),
    ):
        acc = result.get(f"{variant}_accuracy")
        if acc is None:
            continue
        worst = result.get(f"{variant}_accuracy_worst10")
        table.add_row(
            label,
            f"{acc:.3f}",
            f"{result.get(f'{variant}_f1', float('nan')):.3f}",
            "" if worst is None else f"{worst:.3f}",
        )
    console.print(table)
    gain = result.get("personalisation_gain")
    if gain is not None:
        console.print(f"personalisation gain (accuracy): [bold]{gain:+.3f}[/]")
    console.print(
        f"rounds {result.get('rounds')}, clients {result.get('clients')}, "
        f"data version {result.get('data_version')}"
    )
    console.print(
        f"MLflow run: [bold]{result.get('mlflow_run_id')}[/]"
        + (
            f"; registered model version {result['model_version']} (alias challenger)"
            if result.get("model_version")
            else ""
        )
    )
    next_steps = "compare runs: [bold]fedmtl ui[/] (or [bold]fedmtl compare RUN_A RUN_B[/])"
    if result.get("model_version"):
        next_steps += "; make it the champion: [bold]fedmtl promote[/]"
    console.print(next_steps)
