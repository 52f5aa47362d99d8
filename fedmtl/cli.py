"""``fedmtl``: the command line. Exit codes: 0 done, 1 the run failed, 2 bad settings or input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedmtl import quiet
from fedmtl.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="The data pipeline's stages (what dvc.yaml runs).")
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="parameter file (DVC's params.yaml)")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a setting: key=value (repeatable)")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's and libraries' logs")]


def _config(params: Path, overrides: list[str] | None) -> Config:
    try:
        return load_config(params if params.exists() or str(params) != "params.yaml" else None, overrides)
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _fail(exc: BaseException, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code) from None


@data_app.command("prepare")
def data_prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Load the configured source (digits, synthetic, your table) into data/raw/."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data import DataError, prepare

    try:
        path = prepare(cfg.data)
    except (DataError, FileNotFoundError) as exc:
        _fail(exc, 2)
    console.print(f"prepared [bold]{cfg.data.source}[/] data in {path}")


@data_app.command("partition")
def data_partition(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Split the prepared data into one Parquet file per client (train + held-out test)."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data import DataError, partition

    try:
        manifest = partition(cfg.data)
    except (DataError, FileNotFoundError) as exc:
        _fail(exc, 2)
    console.print(
        f"wrote {len(manifest.clients)} client partitions ({manifest.scheme}) to {cfg.data.partitions_dir}"
    )


@data_app.command("validate")
def data_validate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Run the Great Expectations suite on every partition; quarantine the ones that fail."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data.manifest import read_manifest
    from fedmtl.validation import validate_partitions

    try:
        manifest = read_manifest(cfg.data.partitions_dir)
    except FileNotFoundError as exc:
        _fail(exc, 2)
    report = validate_partitions(cfg.data.partitions_dir, manifest, cfg.validation, cfg.data.validation_dir)
    console.print(
        f"validated {len(report.clients)} partitions: {len(report.passed)} passed, "
        f"{len(report.quarantined)} quarantined (report: {cfg.data.validation_dir}/report.json)"
    )
    for client, reasons in report.quarantined.items():
        console.print(f"  [yellow]quarantined[/] {client}: {reasons[0]}")


def _train(cfg: Config, whole_pipeline: bool) -> dict:
    from flows.runtime import run_and_settle

    if whole_pipeline:
        from flows.pipeline import pipeline as flow_fn
    else:
        from flows.training import federated_training as flow_fn
    try:
        return run_and_settle(flow_fn, cfg.model_dump(mode="json"))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc, 2)
    except Exception as exc:  # noqa: BLE001 - the flow's failure, reported without a traceback
        _fail(exc, 1)
    raise AssertionError("unreachable")


@app.command("train")
def train(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Federated training on the validated partitions (the DVC train stage)."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=False)
    print_summary(result)


@app.command("run")
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """The whole pipeline in one Prefect flow run: prepare, partition, validate, train."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=True)
    print_summary(result)


@app.command("report")
def report(metrics_file: Annotated[Path, typer.Argument()] = Path("metrics.json")) -> None:
    """Print the summary of the last training run from its DVC metrics file."""
    if not metrics_file.exists():
        _fail(FileNotFoundError(f"'{metrics_file}' does not exist: run `make run` or `fedmtl run` first"), 2)
    print_summary(json.loads(metrics_file.read_text()))


def print_summary(result: dict) -> None:
    table = Table(title="fedmtl: final round, mean over clients' held-out splits", title_justify="left")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("worst-10 % acc.", justify="right")
    for variant, label in (("global", "global (shared head)"), ("group", "group heads"),
                           ("personal", "personalised")):
        acc = result.get(f"{variant}_accuracy")
        if acc is None:
            continue
        worst = result.get(f"{variant}_accuracy_worst10")
        table.add_row(label, f"{acc:.3f}", f"{result.get(f'{variant}_f1', float('nan')):.3f}",
                      "" if worst is None else f"{worst:.3f}")
    console.print(table)
    gain = result.get("personalisation_gain")
    if gain is not None:
        console.print(f"personalisation gain (accuracy): [bold]{gain:+.3f}[/]")
    console.print(f"rounds {result.get('rounds')}, clients {result.get('clients')}, "
                  f"data version {result.get('data_version')}")
    console.print(f"MLflow run: [bold]{result.get('mlflow_run_id')}[/]"
                  + (f"; registered model version {result['model_version']} (alias challenger)"
                     if result.get("model_version") else ""))
    console.print("open the UI: [bold]mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db[/]")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
