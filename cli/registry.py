"""The model-registry commands: ``fedmtl promote``, ``rollback``, ``evaluate`` and ``serve``,
with the loading of a registered model (verified against its recorded hashes) that
``fedmtl personalize`` uses too."""

from __future__ import annotations

import sys
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

DEFAULT_MODEL = "models:/fedmtl-personalized@challenger"
REJECTED = 3  # exit code of `fedmtl promote` when a gate fails (the champion stays)

ActorOpt = Annotated[
    Optional[str], typer.Option("--actor", help="who decides (recorded; default: the OS user)")
]


@app.command("promote")
def promote(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    challenger: Annotated[
        str, typer.Option("--challenger", "-c", help="the version to judge: a number or an alias")
    ] = "challenger",
    actor: ActorOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="decide and print, change nothing")
    ] = False,
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

    outcome = _run_flow(
        flow_fn, cfg.model_dump(mode="json"), challenger=challenger, actor=actor, dry_run=dry_run
    )
    _print_decision(outcome)
    if not outcome["promote"]:
        raise typer.Exit(REJECTED)


@app.command("rollback")
def rollback(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    actor: ActorOpt = None,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="why (recorded with the decision)")
    ] = "",
    verbose: VerboseOpt = False,
) -> None:
    """Give the alias champion back to the version the current champion replaced."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    _check_tracking(cfg.tracking.tracking_uri)
    from flows.promote import rollback as flow_fn

    done = _run_flow(flow_fn, cfg.model_dump(mode="json"), actor=actor, reason=reason)
    console.print(
        f"champion of [bold]{done['model']}[/]: version {done['from_version']} -> "
        f"[bold]{done['to_version']}[/] (by {done['by']}; record run {done['record_run']})"
    )


@app.command("evaluate")
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="an alias or version of tracking.registered_model, "
            "a models:/ or runs:/ URI, or a bundle file",
        ),
    ] = "champion",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="write the per-client scores (.csv)")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Score a registered model on every client's held-out split.

    Each client's rows go through the model's own routing (personal, group or global heads),
    as they would when served; only clients whose partitions passed validation count."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data.manifest import read_manifest
    from fedmtl.data.validation import read_report, usable_clients
    from fedmtl.eval.metrics import HIGHER_IS_BETTER, worst_fraction_mean
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
                table.add_row(
                    str(task),
                    metric,
                    f"{rows[metric].mean():.4f}",
                    f"{worst_fraction_mean(rows[metric], higher):.4f}",
                )
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
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="an alias or version of tracking.registered_model, or a models:/ URI",
        ),
    ] = "champion",
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
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which(
        "mlflow"
    )
    if mlflow_bin is None:
        _fail(FileNotFoundError("the `mlflow` command is not installed in this environment"), 2)
    if "://" not in uri and ":/" not in uri:
        _fail(
            ValueError(
                f"model '{uri}': serve a registered version (an alias, a version number or a "
                "models:/ URI)"
            ),
            2,
        )
    # the server loads the local copy whose hashes were just checked, never the store again (a
    # second download could hold other files); it stays for the server's lifetime
    copy = Path(tempfile.mkdtemp(prefix="fedmtl-serve-"))
    try:
        local, _ = _load_predictor(uri, tracking, into=copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    console.print(
        f"serving [bold]{uri}[/] (verified copy {local}) at http://{host}:{port}/invocations "
        "(Ctrl-C stops)"
    )
    sys.stdout.flush()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    os.execve(
        mlflow_bin,
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            str(local),
            "--env-manager",
            "local",
            "--host",
            host,
            "--port",
            str(port),
        ],
        env,
    )


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
    return (
        f"models:/{registered_model}/{model}"
        if model.isdigit()
        else f"models:/{registered_model}@{model}"
    )


def _tracking_uri(uri: str) -> str:
    """A relative sqlite:/// store made absolute (the scoring server runs in another process)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _print_judged(outcome: dict) -> None:
    """Which versions the decision is about (number, MLflow run, method), and, when another
    version looks like the better candidate, the command that judges it instead."""
    judged = outcome.get("judged")
    if not judged:
        return

    def named(who: dict) -> str:
        return (
            f"version {who['version']} (MLflow run {who['run_id'] or 'none'}, "
            f"method {who['method']})"
        )

    ref = str(judged.get("challenger_ref") or "").lstrip("@")
    how = f" (alias {ref})" if ref and not ref.isdigit() else ""
    console.print(f"judging {named(judged['challenger'])}{how}")
    console.print(
        f"champion: {named(judged['champion'])}" if judged.get("champion") else "champion: none yet"
    )
    for note in judged.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if judged.get("suggest"):
        console.print(
            f"[yellow]to judge version {judged['suggest']} instead:[/] "
            f"fedmtl promote --challenger {judged['suggest']}",
            highlight=False,
        )


def _print_decision(outcome: dict) -> None:
    _print_judged(outcome)
    table = Table(
        title=f"{outcome['model']}: challenger version {outcome['challenger_version']} vs "
        f"champion {outcome['champion_version'] or '(none yet)'} — "
        f"{outcome['task']}/{outcome['metric']}",
        title_justify="left",
    )
    table.add_column("gate")
    table.add_column("result")
    table.add_column("detail")
    for check in outcome["checks"]:
        table.add_row(
            check["name"], "[green]pass[/]" if check["passed"] else "[red]FAIL[/]", check["detail"]
        )
    console.print(table)
    version, old = outcome["challenger_version"], outcome["champion_version"]
    if outcome["dry_run"]:
        verdict = "would be promoted" if outcome["promote"] else "would be rejected"
        console.print(f"dry run: version {version} {verdict}; nothing was changed")
    elif outcome["promote"]:
        was = (
            f" (was version {old}, now tagged previous_champion)"
            if old
            else " (the first champion)"
        )
        console.print(
            f"[bold green]promoted[/]: version {version} is the champion of {outcome['model']}{was}"
        )
    else:
        console.print(
            f"[bold red]rejected[/]: version {version} stays a challenger; the champion is "
            f"{'version ' + old if old else 'still unset'}. Reasons are on the version's tags"
        )
        suggest = (outcome.get("judged") or {}).get("suggest")
        if suggest:
            console.print(
                f"another candidate: fedmtl promote --challenger {suggest}", highlight=False
            )
    if outcome.get("record_run"):
        console.print(f"decision recorded by {outcome['by']}: MLflow run {outcome['record_run']}")


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
            return PersonalizedPredictor(
                PersonalizedBundle.from_dict(torch.load(path, weights_only=True))
            )
        except Exception as exc:  # noqa: BLE001 - not a bundle: the user's input
            _fail(ValueError(f"'{model}' is not a fedmtl model bundle: {exc}"), 2)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.exists():
            _fail(
                FileNotFoundError(
                    f"tracking store '{tracking_uri}' does not exist (no file '{db}'): "
                    "train first, or pass --tracking-uri"
                ),
                2,
            )
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
        _fail(
            ValueError(
                f"cannot load model '{model}' from {tracking_uri}: {str(exc).splitlines()[0]}"
            ),
            2,
        )
    return predictor
