"""fedmtl: federated multi-task learning as a Prefect + MLflow + DVC workflow.

Exit codes: 0 done, 1 the run failed, 2 bad settings or input, 3 a promotion was rejected
(the champion stays), 130 interrupted."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedmtl import quiet
from fedmtl.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # pandas is imported where a command needs it (fast --help)
    import pandas as pd

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode="markdown")
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
        _fail(exc, 2)
    raise AssertionError("unreachable")


def _fail(exc: BaseException, code: int = 1) -> None:
    from rich.markup import escape  # ids and values in messages are text, not markup

    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code) from None


@contextmanager
def _data_warnings() -> Iterator[None]:
    """Print the data stages' DataWarnings (what validation will quarantine, odd client ids)
    as ``warning:`` lines; other warnings go on as usual."""
    import warnings

    from rich.markup import escape

    from fedmtl.data.sources import DataWarning

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, DataWarning):
                err.print(f"[bold yellow]warning:[/] {escape(str(w.message))}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _check_tracking(uri: str, setting: str = "tracking.tracking_uri") -> None:
    """Fail fast (exit 2) when an http(s) tracking server does not accept connections: MLflow
    itself retries for minutes before it gives up."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port that is not a number
        _fail(ConfigError(f"{setting} = '{uri}' is not a valid URI: {exc}"), 2)
    if not host:
        _fail(ConfigError(f"{setting} = '{uri}' names no host"), 2)
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return  # reached through a proxy: MLflow's own requests will tell
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        _fail(ConfigError(f"{setting} = '{uri}': the MLflow tracking server cannot be reached "
                          f"({host}:{port}: {reason}); start it, or set {setting} to a reachable "
                          "server or a sqlite:/// store"), 2)


@data_app.command("prepare")
def data_prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Load the configured source (digits, synthetic, your table) into data/raw/."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data import DataError, prepare

    try:
        with _data_warnings():
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
        with _data_warnings():
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
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a manifest's fields
        _fail(ValueError(f"'{Path(cfg.data.partitions_dir) / 'manifest.json'}' is not a valid manifest "
                         f"({type(exc).__name__}: {exc}): run `fedmtl data partition` again"), 2)
    report = validate_partitions(cfg.data.partitions_dir, manifest, cfg.validation, cfg.data.validation_dir)
    console.print(
        f"validated {len(report.clients)} partitions: {len(report.passed)} passed, "
        f"{len(report.quarantined)} quarantined (report: {cfg.data.validation_dir}/report.json)"
    )
    for client, reasons in report.quarantined.items():
        console.print(f"  [yellow]quarantined[/] {client}: {reasons[0]}")


@app.command("check")
def check(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Load and check the settings as every command does, touching nothing (`make run` runs it
    before `dvc repro`): a bad setting fails here (exit 2) with the message the stages give."""
    cfg = _config(params, set_)
    where = f"'{params}'" if params.exists() else f"no '{params}': the defaults"
    console.print(f"settings ok ({where}; data.source={cfg.data.source}, "
                  f"training.rounds={cfg.training.rounds}, algorithm.method={cfg.algorithm.method})",
                  highlight=False)


class RoundsBar:
    """A rich progress bar over rounds and, within a round, the clients that finished."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console,
                            disable=not console.is_terminal, transient=False)
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
        self.bar.reset(self.clients, total=clients, description=f"  round {round_}: clients", note="")

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
        with api.settings(), RoundsBar() as bar, progress.reporting(bar), worker_environment(cfg.runner), \
                stopping_safely(bar.note, last_words=f"Checkpoints on disk are complete; {resume_hint}"):
            extra = {"resume": True} if resume else {}
            return run_and_settle(flow_fn, cfg.model_dump(mode="json"), **extra)
    except Interrupted as exc:  # stopped at a safe point; the MLflow run is KILLED
        console.print(f"interrupted at round {exc.round}; {resume_hint} (with the same settings)", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc, 2)
    except Exception as exc:  # noqa: BLE001 - the flow's failure, reported without a traceback
        _fail(exc, 1)
    raise AssertionError("unreachable")


DaskOpt = Annotated[Optional[str], typer.Option(
    "--dask-address", help="run the client tasks on this Dask scheduler (runner.kind=dask, runner.dask_address)")]


def _with_dask(set_: list[str] | None, address: str | None) -> list[str] | None:
    return [*(set_ or []), "runner.kind=dask", f"runner.dask_address={address}"] if address else set_


ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="continue the newest interrupted run with the same settings and data after its last "
    "complete round (its checkpoint), in the same MLflow run")]


@app.command("train")
def train(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False,
          dask_address: DaskOpt = None, resume: ResumeOpt = False) -> None:
    """Federated training on the validated partitions (the DVC train stage)."""
    cfg = _config(params, _with_dask(set_, dask_address))
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=False, verbose=verbose, resume=resume)
    print_summary(result)


@app.command("run")
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False,
        dask_address: DaskOpt = None) -> None:
    """The whole pipeline in one Prefect flow run: prepare, partition, validate, train."""
    cfg = _config(params, _with_dask(set_, dask_address))
    quiet.configure(verbose)
    result = _train(cfg, whole_pipeline=True, verbose=verbose)
    print_summary(result)


@app.command("report")
def report(metrics_file: Annotated[Path, typer.Argument()] = Path("metrics.json")) -> None:
    """Print the summary of the last training run from its DVC metrics file."""
    if not metrics_file.exists():
        _fail(FileNotFoundError(f"'{metrics_file}' does not exist: run `make run` or `fedmtl run` first"), 2)
    print_summary(json.loads(metrics_file.read_text()))


DEFAULT_MODEL = "models:/fedmtl-personalized@challenger"
DEFAULT_TRACKING = "sqlite:///mlflow/mlflow.db"
REJECTED = 3  # exit code of `fedmtl promote` when a gate fails (the champion stays)

ActorOpt = Annotated[Optional[str], typer.Option("--actor", help="who decides (recorded; default: the OS user)")]


@app.command("promote")
def promote(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    challenger: Annotated[str, typer.Option("--challenger", "-c", help="the version to judge: a number or an "
                                                                       "alias")] = "challenger",
    actor: ActorOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="decide and print, change nothing")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Promote the challenger to champion if it passes every gate.

    Both versions answer every validated client's held-out split; the gates in `promotion`
    compare their per-client scores. Exit codes: 0 promoted, 3 rejected (the champion stays;
    the reasons are on the version's tags), 2 bad settings or unknown model/version, 1 the flow
    failed."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    _check_tracking(cfg.tracking.tracking_uri)
    from flows.promote import promote as flow_fn

    outcome = _run_flow(flow_fn, cfg.model_dump(mode="json"), challenger=challenger, actor=actor,
                        dry_run=dry_run)
    _print_decision(outcome)
    if not outcome["promote"]:
        raise typer.Exit(REJECTED)


@app.command("rollback")
def rollback(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    actor: ActorOpt = None,
    reason: Annotated[str, typer.Option("--reason", "-r", help="why (recorded with the decision)")] = "",
    verbose: VerboseOpt = False,
) -> None:
    """Give the alias champion back to the version the current champion replaced."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    _check_tracking(cfg.tracking.tracking_uri)
    from flows.promote import rollback as flow_fn

    done = _run_flow(flow_fn, cfg.model_dump(mode="json"), actor=actor, reason=reason)
    console.print(f"champion of [bold]{done['model']}[/]: version {done['from_version']} -> "
                  f"[bold]{done['to_version']}[/] (by {done['by']}; record run {done['record_run']})")


@app.command("evaluate")
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help="an alias or version of tracking.registered_model, "
                                                             "a models:/ or runs:/ URI, or a bundle file")] = "champion",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the per-client scores (.csv)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Score a registered model on every client's held-out split.

    Each client's rows go through the model's own routing (personal, group or global heads),
    as they would when served; only clients whose partitions passed validation count."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data.manifest import read_manifest
    from fedmtl.evaluation import HIGHER_IS_BETTER, worst_fraction_mean
    from fedmtl.validation import read_report, usable_clients
    from models.scoring import held_out_rows, score_clients

    uri = _model_uri(model, cfg.tracking.registered_model)
    predictor = _load_predictor(uri, cfg.tracking.tracking_uri)
    try:
        manifest = read_manifest(cfg.data.partitions_dir)
        clients = usable_clients(manifest, read_report(cfg.data.validation_dir), 1)
        scores = score_clients(predictor, held_out_rows(cfg.data.partitions_dir, clients))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc, 2)
    table = Table(title=f"{uri}: {len(clients)} clients' held-out splits", title_justify="left")
    for column in ("task", "metric", "client mean", "worst-10 %"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, rows in scores.groupby("task", sort=False):
        for metric, higher in HIGHER_IS_BETTER.items():
            if metric in rows and rows[metric].notna().any():
                table.add_row(str(task), metric, f"{rows[metric].mean():.4f}",
                              f"{worst_fraction_mean(rows[metric], higher):.4f}")
    console.print(table)
    heads = scores.drop_duplicates("client")["head"].value_counts().to_dict()
    console.print("heads that answered: " + ", ".join(f"{h} {n}" for h, n in heads.items()))
    if out is not None:
        scores.to_csv(out, index=False)
        console.print(f"wrote per-client scores to {out}")


@app.command("serve")
def serve(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help="an alias or version of tracking.registered_model, "
                                                             "or a models:/ URI")] = "champion",
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 5001,
) -> None:
    """Serve a registered model (default: the champion) over HTTP.

    Runs MLflow's scoring server (`mlflow models serve --env-manager local`); POST rows of
    client_id plus the feature columns to /invocations."""
    import os
    import shutil
    import tempfile

    cfg = _config(params, set_)
    quiet.configure()
    uri = _model_uri(model, cfg.tracking.registered_model)
    tracking = _tracking_uri(cfg.tracking.tracking_uri)
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_bin is None:
        _fail(FileNotFoundError("the `mlflow` command is not installed in this environment"), 2)
    if "://" not in uri and ":/" not in uri:
        _fail(ValueError(f"model '{uri}': serve a registered version (an alias, a version number or a "
                         "models:/ URI)"), 2)
    # the server loads the local copy whose hashes were just checked, never the store again (a
    # second download could hold other files); it stays for the server's lifetime
    copy = Path(tempfile.mkdtemp(prefix="fedmtl-serve-"))
    try:
        local, _ = _load_predictor(uri, tracking, into=copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    console.print(f"serving [bold]{uri}[/] (verified copy {local}) at http://{host}:{port}/invocations "
                  "(Ctrl-C stops)")
    sys.stdout.flush()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    os.execve(mlflow_bin, [mlflow_bin, "models", "serve", "-m", str(local), "--env-manager", "local",
                           "--host", host, "--port", str(port)], env)


def _own_errors(verbose: bool) -> None:
    """The command reports a failed flow run itself (one line, the cause): unless --verbose,
    Prefect's engine does not print its traceback as well."""
    if not verbose:
        import logging

        class EngineFailures(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                text = record.getMessage()
                return not text.startswith(("Encountered exception during execution",
                                            "Task run failed with exception", "Finished in state Failed"))

        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(type(f).__name__ == "EngineFailures" for f in logger.filters):
                logger.addFilter(EngineFailures())


def _run_flow(flow_fn, *args, **kwargs) -> dict:
    from flows.runtime import run_and_settle

    _own_errors(False)

    try:
        return run_and_settle(flow_fn, *args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc, 2)
    except Exception as exc:  # noqa: BLE001 - the flow's failure, reported without a traceback
        _fail(exc, 1)
    raise AssertionError("unreachable")


def _model_uri(model: str, registered_model: str) -> str:
    """An alias (``champion``) or version (``3``) of the registered model as a models:/ URI;
    URIs and file paths as given."""
    if ":/" in model or "/" in model or model.endswith(".pt"):
        return model
    model = model.lstrip("@")
    return f"models:/{registered_model}/{model}" if model.isdigit() else f"models:/{registered_model}@{model}"


def _tracking_uri(uri: str) -> str:
    """A relative sqlite:/// store made absolute (the scoring server runs in another process)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _print_judged(outcome: dict) -> None:
    """Which versions the decision is about (number, MLflow run, method), and, when another
    version looks like the better candidate, the command that judges it instead."""
    judged = outcome.get("judged")
    if not judged:
        return
    def named(who: dict) -> str:
        return f"version {who['version']} (MLflow run {who['run_id'] or 'none'}, method {who['method']})"
    ref = str(judged.get("challenger_ref") or "").lstrip("@")
    how = f" (alias {ref})" if ref and not ref.isdigit() else ""
    console.print(f"judging {named(judged['challenger'])}{how}")
    console.print(f"champion: {named(judged['champion'])}" if judged.get("champion")
                  else "champion: none yet")
    for note in judged.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if judged.get("suggest"):
        console.print(f"[yellow]to judge version {judged['suggest']} instead:[/] "
                      f"fedmtl promote --challenger {judged['suggest']}", highlight=False)


def _print_decision(outcome: dict) -> None:
    _print_judged(outcome)
    table = Table(title=f"{outcome['model']}: challenger version {outcome['challenger_version']} vs "
                        f"champion {outcome['champion_version'] or '(none yet)'} — "
                        f"{outcome['task']}/{outcome['metric']}", title_justify="left")
    table.add_column("gate")
    table.add_column("result")
    table.add_column("detail")
    for check in outcome["checks"]:
        table.add_row(check["name"], "[green]pass[/]" if check["passed"] else "[red]FAIL[/]", check["detail"])
    console.print(table)
    version, old = outcome["challenger_version"], outcome["champion_version"]
    if outcome["dry_run"]:
        verdict = "would be promoted" if outcome["promote"] else "would be rejected"
        console.print(f"dry run: version {version} {verdict}; nothing was changed")
    elif outcome["promote"]:
        was = f" (was version {old}, now tagged previous_champion)" if old else " (the first champion)"
        console.print(f"[bold green]promoted[/]: version {version} is the champion of {outcome['model']}{was}")
    else:
        console.print(f"[bold red]rejected[/]: version {version} stays a challenger; the champion is "
                      f"{'version ' + old if old else 'still unset'}. Reasons are on the version's tags")
        suggest = (outcome.get("judged") or {}).get("suggest")
        if suggest:
            console.print(f"another candidate: fedmtl promote --challenger {suggest}", highlight=False)
    if outcome.get("record_run"):
        console.print(f"decision recorded by {outcome['by']}: MLflow run {outcome['record_run']}")


@app.command("personalize")
def personalize(
    support: Annotated[Path, typer.Argument(help="CSV or Parquet: the feature columns and the label columns; "
                                                 "its labelled rows are the support set")],
    model: Annotated[str, typer.Option("--model", "-m", help="registered model URI (models:/name@alias, "
                                                             "runs:/id/model) or a bundle file (.pt)")] = DEFAULT_MODEL,
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking store")] = DEFAULT_TRACKING,
    client_id: Annotated[Optional[str], typer.Option(
        "--client-id", help="the new client's id (default: the file's client_id column, else 'new-client')")] = None,
    predict: Annotated[Optional[Path], typer.Option(
        "--predict", help="CSV or Parquet of rows to predict (default: the support file's rows)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="predictions file (.csv or .parquet)")] = Path("predictions.csv"),
    verbose: VerboseOpt = False,
) -> None:
    """Cold start: a model for a client that took no part in training.

    Picks the client's group by the loss of each group head on its labelled rows, fine-tunes
    its own head on them and predicts (no labelled rows: the global heads)."""
    quiet.configure(verbose)
    import pandas as pd

    from fedmtl.coldstart import encode_support
    from models.personalized import CLIENT_COLUMN, HEAD_COLUMN

    frame = _read_table(support, "support file")
    predictor = _load_predictor(model, tracking_uri)
    features, tasks = predictor.bundle.features, predictor.tasks
    client = client_id or _client_of(frame, CLIENT_COLUMN) or "new-client"
    _require_features(frame, features, support)
    labels = predictor.label_columns(frame)
    labelled = frame[frame[labels].notna().any(axis=1)] if labels else frame.iloc[:0]
    if predictor.is_known(client):
        console.print(f"[yellow]note:[/] client '{client}' is known to the model; personalising from "
                      "the support rows anyway")
    try:
        result = predictor.cold_start(client, labelled)
    except ValueError as exc:
        _fail(exc, 2)
    if result.source == "global":
        console.print(f"client [bold]{client}[/]: no labelled rows in '{support}' (label columns: "
                      f"{', '.join(t.name for t in tasks)}): predicting with the [bold]global[/] heads")
    else:
        cfg = predictor.coldstart_settings()
        start = (f"chose group [bold]{result.group}[/]" if result.group is not None
                 else "started from the global heads (the model has no group heads)")
        console.print(f"client [bold]{client}[/]: {result.n_labelled} labelled rows; {start}; fine-tuned its "
                      f"head for {cfg.epochs} epochs (lr {cfg.lr}, prox_mu {cfg.prox_mu})")
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
    keep = [c for c in target.columns if c not in set(features) | {t.name for t in tasks} | {CLIENT_COLUMN}]
    written = pd.concat([target[keep].reset_index(drop=True),
                         predicted.reset_index(drop=True).drop(columns=[HEAD_COLUMN])], axis=1)
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
        _fail(ValueError(f"'{path}' is missing feature column(s) {', '.join(missing[:10])}{more} "
                         f"(the model needs {len(features)}: {features[0]} ... {features[-1]})"), 2)


def _client_of(frame: "pd.DataFrame", column: str) -> str | None:
    if column in frame.columns:
        ids = frame[column].dropna().astype(str).unique()
        if len(ids) == 1:
            return str(ids[0])
        if len(ids) > 1:
            _fail(ValueError(f"the support file holds {len(ids)} clients in '{column}'; "
                             "give one client's rows (or --client-id)"), 2)
    return None


def _load_predictor(model: str, tracking_uri: str, into: Path | None = None):
    """The predictor inside a registered pyfunc model, or from a bundle file. A model URI is
    loaded only from a local copy of its artifacts that matched the hashes recorded when it was
    registered (exit 2 otherwise). ``into``: download that copy into this folder and keep it;
    then returns (the model's folder there, the predictor)."""
    from models.personalized import PersonalizedBundle, PersonalizedPredictor

    path = Path(model)
    if "://" not in model and ":/" not in model:
        if not path.is_file():
            _fail(FileNotFoundError(f"model '{model}' is neither a model URI nor a bundle file"), 2)
        import torch

        try:
            return PersonalizedPredictor(PersonalizedBundle.from_dict(torch.load(path, weights_only=True)))
        except Exception as exc:  # noqa: BLE001 - not a bundle: the user's input
            _fail(ValueError(f"'{model}' is not a fedmtl model bundle: {exc}"), 2)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.exists():
            _fail(FileNotFoundError(f"tracking store '{tracking_uri}' does not exist (no file '{db}'): "
                                    "train first, or pass --tracking-uri"), 2)
    _check_tracking(tracking_uri, "the tracking URI")
    from tasks.registry import ModelIntegrityError, load_predictor, predictor_from, verified_copy

    try:
        if into is not None:  # keep the verified copy (fedmtl serve serves from it)
            local = verified_copy(model, tracking_uri, into)  # the model's folder inside ``into``
            return local, predictor_from(local)
        predictor = load_predictor(model, tracking_uri)  # checks the artifacts before loading any
    except ModelIntegrityError as exc:  # changed artifacts, or no recorded hashes: refused
        _fail(ModelIntegrityError(f"refusing to load model '{model}': {exc}"), 2)
    except Exception as exc:  # noqa: BLE001 - unknown name, alias, run or store
        _fail(ValueError(f"cannot load model '{model}' from {tracking_uri}: {str(exc).splitlines()[0]}"), 2)
    return predictor


def _print_scores(predicted, target, truth, tasks, path: Path) -> None:
    import numpy as np

    from fedmtl.coldstart import present

    for task in tasks:
        mask = present(truth[task.name]).numpy()
        if task.name not in target.columns or not mask.any():
            continue
        if task.kind == "classification":
            index = {c: i for i, c in enumerate(task.classes)}
            pred = np.array([index[v] for v in predicted[task.name].tolist()])
            acc = float((pred[mask] == truth[task.name].numpy()[mask]).mean())
            console.print(f"accuracy on '{path}' ({task.name}, {int(mask.sum())} labelled rows): [bold]{acc:.3f}[/]")
        else:
            err_ = np.abs(predicted[task.name].to_numpy(dtype=float)[mask] - truth[task.name].numpy()[mask])
            console.print(f"MAE on '{path}' ({task.name}, {int(mask.sum())} labelled rows): [bold]{err_.mean():.4f}[/]")


@app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="two or more MLflow run ids or run names")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking store")] = DEFAULT_TRACKING,
    all_params: Annotated[bool, typer.Option("--all-params", help="show equal parameters too")] = False,
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", "-m", help="only metrics matching: a glob (personal/*) or a substring (accuracy); "
                               "repeatable")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Runs side by side: the parameters that differ and each final metric (last round), the
    better value marked ✓ (higher accuracy/precision/recall/F1/gain/ARI, lower loss and time)."""
    quiet.configure(verbose)
    from fedmtl.comparison import BEST_MARK, compare as compare_runs

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
    sections = (("parameter" if not all_params else "parameter (all)", result.params + result.tags),
                ("final metric (last round)", result.metrics))
    for title, rows in sections:
        table = Table(title_justify="left")
        # names are never cut; on a narrow terminal the run columns fold instead
        table.add_column(title, no_wrap=True, min_width=max([len(title), *(len(row.key) for row in rows)]))
        for r in result.runs:
            table.add_column(r.name, justify="right", overflow="fold")
        for row in rows:
            table.add_row(row.key, *(f"[bold green]{c}[/]" if i in row.best else c
                                     for i, c in enumerate(row.cells())))
        if rows:
            console.print(table)
        elif title.startswith("parameter"):
            console.print("parameters: all equal (--all-params shows them)")
        else:
            console.print("no final metrics" + (f" matching {', '.join(metric)}" if metric else ""))
    console.print(f"{BEST_MARK} better: higher accuracy, precision, recall, F1, gain, ARI; lower loss, "
                  "error and time/*")


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option("--port", "-p", help="port to listen on")] = 5000,
    host: Annotated[str, typer.Option("--host", help="interface to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking store")] = DEFAULT_TRACKING,
    allowed_hosts: Annotated[Optional[str], typer.Option(
        "--allowed-hosts", help="Host headers MLflow accepts beyond localhost and private IPs "
                                "(MLflow 3's DNS-rebinding protection), e.g. mlflow.example.com")] = None,
) -> None:
    """The MLflow UI on the tracking store: replaces this process with `mlflow ui` (Ctrl-C stops it)."""
    import os
    import shutil

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            _fail(FileNotFoundError(f"tracking store '{tracking_uri}' does not exist (no file '{db}'): "
                                    "train first, or pass --tracking-uri"), 2)
    beside = Path(sys.executable).with_name("mlflow")
    exe = str(beside) if beside.is_file() else shutil.which("mlflow")
    if exe is None:
        _fail(FileNotFoundError("the `mlflow` command is not installed (pip install mlflow)"), 2)
    args = [exe, "ui", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port)]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(f"MLflow UI on [bold]http://{shown}:{port}[/] (store {tracking_uri}); Ctrl-C stops it")
    sys.stdout.flush()
    # MLflow 3 also starts a GenAI job runner (a pool of worker processes) that runs and models never use
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(exe, args)


@app.command("schedule")
def schedule(
    cron: Annotated[Optional[str], typer.Option(
        "--cron", help='cron expression, e.g. "0 2 * * *" (02:00 every day; UTC unless --timezone)')] = None,
    interval: Annotated[Optional[float], typer.Option("--interval", help="seconds between runs (instead of --cron)")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="deployment name (default: schedule.deployment)")] = None,
    timezone: Annotated[Optional[str], typer.Option("--timezone", help="time zone of --cron, e.g. Europe/Berlin")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Schedule recurring training (a Prefect deployment, served in the foreground).

    The deployment fedmtl-scheduled/NAME runs on the schedule: DVC data refresh, warm start
    from the champion, training, promotion gates; one run at a time. Needs a Prefect server
    (PREFECT_API_URL). Ctrl-C stops serving and pauses the schedule."""
    import datetime as dt

    cfg = _config(params, set_)
    quiet.configure(verbose)
    if (cron is None) == (interval is None):
        _fail(ValueError('give exactly one schedule: --cron "0 2 * * *" or --interval SECONDS'), 2)
    _check_schedule(cron, interval, timezone)  # before the DVC and Prefect server checks
    if cfg.schedule.refresh_data:
        from fedmtl.datarefresh import DataRefreshError, check_params, require_project

        try:
            check_params(cfg, require_project(Path.cwd()))
        except DataRefreshError as exc:
            _fail(exc, 2)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api = PREFECT_API_URL.value()
    if not api:
        _fail(ValueError("fedmtl schedule needs a Prefect server to keep the schedule: start one with "
                         "`prefect server start`, then `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` "
                         "(or export PREFECT_API_URL)"), 2)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        _fail(ConnectionError(f"cannot reach the Prefect API at {api} (PREFECT_API_URL): {unhealthy}"), 2)
    from flows.deploy import FLOW_NAME, ScheduleError, build_deployment, describe_schedule, next_run
    from flows.deploy import serve as serve_deployment

    try:
        deployment = build_deployment(cfg, name, cron, interval, timezone)
    except ScheduleError as exc:
        _fail(exc, 2)
    full = f"{FLOW_NAME}/{deployment.name}"
    when = next_run(deployment)
    if when is not None:
        wait = when - dt.datetime.now(dt.timezone.utc)
        minutes = max(0, int(wait.total_seconds() // 60))
        when_text = f"{when:%Y-%m-%d %H:%M:%S %Z} (in {minutes // 60} h {minutes % 60} min)"
    else:
        when_text = "unknown"
    steps = ("DVC data refresh (prepare, partition, validate" + (", push" if cfg.schedule.push_data else "") + ") → "
             if cfg.schedule.refresh_data else "")
    start = "the champion" if cfg.schedule.warm_start == "champion" else "a fresh initialisation"
    console.print(f"serving deployment [bold]{full}[/] (Prefect API {api})")
    console.print(f"  schedule:   {describe_schedule(deployment)}; next run {when_text}")
    judged = " → promotion gates (champion if it passes)" if cfg.schedule.promote else ""
    console.print(f"  each run:   {steps}train {cfg.training.rounds} rounds from {start} "
                  f"of '{cfg.tracking.registered_model}'{judged}")
    console.print("  overlap:    never (concurrency limit 1: a run due while one runs waits for it)")
    console.print(f"  run now:    [bold]prefect deployment run '{full}'[/]")
    if PREFECT_UI_URL.value():
        console.print(f"  runs:       {PREFECT_UI_URL.value()}/deployments")
    console.print("Ctrl-C stops serving (and pauses the schedule until the next `fedmtl schedule`).")
    sys.stdout.flush()
    import logging

    flows_logger = logging.getLogger("prefect.flows")
    shown, level = flows_logger.getEffectiveLevel(), flows_logger.level

    class HowStopped(logging.Filter):
        """Prefect's serve catches Ctrl-C and SIGTERM alike and only logs (at INFO) which it was;
        the logger is opened to INFO to see it, and shows what it showed before."""

        interrupted = False

        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Received KeyboardInterrupt"):
                HowStopped.interrupted = True
            return record.levelno >= shown

    watch = HowStopped()
    flows_logger.addFilter(watch)
    flows_logger.setLevel(min(shown, logging.INFO))
    try:
        serve_deployment(deployment)
    except KeyboardInterrupt:
        HowStopped.interrupted = True
    finally:
        flows_logger.removeFilter(watch)
        flows_logger.setLevel(level)
    console.print(f"stopped serving {full}; its schedule is paused")
    if HowStopped.interrupted:  # Ctrl-C: 130, as an interrupted command; SIGTERM (a service stop): 0
        raise typer.Exit(130)


def _check_schedule(cron: str | None, interval: float | None, timezone: str | None) -> None:
    """Exit 2 naming the option when --cron, --interval or --timezone is invalid (Prefect's own
    validation of cron expressions and IANA time zones)."""
    import datetime as dt

    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    if interval is not None and not interval > 0:
        _fail(ValueError(f"--interval {interval} is not a valid schedule: it must be a positive number of "
                         "seconds"), 2)
    try:
        if cron is not None:
            CronSchedule(cron=cron, timezone=timezone)
        else:
            IntervalSchedule(interval=dt.timedelta(seconds=interval or 1), timezone=timezone)
    except ValidationError as exc:
        problem = exc.errors()[0]
        option = "--timezone" if problem["loc"] and problem["loc"][0] == "timezone" else "--cron"
        value = timezone if option == "--timezone" else cron
        message = str(problem["msg"]).removeprefix("Value error, ")
        _fail(ValueError(f"{option} {value!r} is not a valid schedule: {message}"), 2)


def print_summary(result: dict) -> None:
    basis = result.get("evaluation", "mean over clients")
    table = Table(title=f"fedmtl: final round on the clients' held-out splits, {basis}", title_justify="left")
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
    next_steps = "compare runs: [bold]fedmtl ui[/] (or [bold]fedmtl compare RUN_A RUN_B[/])"
    if result.get("model_version"):
        next_steps += "; make it the champion: [bold]fedmtl promote[/]"
    console.print(next_steps)


def main() -> None:
    """The ``fedmtl`` command. Once a command is done it exits without the interpreter's
    teardown of every loaded module (torch, MLflow, Prefect, pandas: 1-2 s of a short
    command's wall time): the same exit steps run first, in the interpreter's order (the
    threads' exit hooks, e.g. Prefect's event and log workers draining, then the ``atexit``
    handlers: the ephemeral API server stops, MLflow's queue flushes), then the process ends."""
    try:
        app()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    _exit_now(code)


def _exit_now(code: object) -> None:
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import os
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize runs first
        atexit._run_exitfuncs()
    except AttributeError:  # another Python: exit the ordinary way
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
