"""``fedmtl site``: a client as a site on its own machine (docs/sites.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import _fail, app, console

site_app = typer.Typer(
    help="A site: a client on its own machine, its data never leaving it (docs/sites.md).",
    no_args_is_help=True,
)
app.add_typer(site_app, name="site")


@site_app.command("init")
def init(
    site: Annotated[str, typer.Option("--site", help="the site's name (its client id)")],
    partitions: Annotated[
        Path, typer.Option("--partitions", help="the site's own validated partition folder")
    ],
    exchange: Annotated[
        str,
        typer.Option("--exchange", help="the exchange store's URL (fsspec: a folder, s3://...)"),
    ],
    coordinator_key: Annotated[
        Path,
        typer.Option("--coordinator-key", help="the coordinator's public key (coordinator.pub)"),
    ],
    folder: Annotated[Path, typer.Option("--dir", help="the site's folder (created, mode 0700)")],
) -> None:
    """Create the site's folder: its key pair, the coordinator's key, its settings."""
    from fedmtl.sites.identity import IdentityError
    from fedmtl.sites.site import SiteError, init_site

    try:
        root = init_site(folder, site, partitions, exchange, coordinator_key)
    except (SiteError, IdentityError, OSError) as exc:
        _fail(exc, 2)
    console.print(
        f"site '{site}' ready in {root}; give the coordinator {root / 'keys' / (site + '.pub')}"
    )


@site_app.command("coordinator-key")
def coordinator_key(
    folder: Annotated[Path, typer.Option("--dir", help="the coordinator's key folder")],
) -> None:
    """Create the coordinator's key pair (once); sites trust its public key."""
    from fedmtl.sites.identity import COORDINATOR, Identity, IdentityError

    try:
        _, public = Identity.generate(COORDINATOR).save(folder)
    except IdentityError as exc:
        _fail(exc, 2)
    console.print(f"give every site {public}")


@site_app.command("serve")
def serve(
    folder: Annotated[Path, typer.Option("--dir", help="the site's folder")],
) -> None:
    """Serve this site's task (a Prefect task worker of fedmtl_site_NAME): the coordinator's
    rounds run here, in this process."""
    from fedmtl.sites.site import SiteError, read_site

    try:
        read_site(folder)
    except SiteError as exc:
        _fail(exc, 2)
    from flows.sites import serve_site

    serve_site(folder)


@site_app.command("serve-model")
def serve_model(
    folder: Annotated[Path, typer.Option("--dir", help="the site's folder")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="the registered shared model (a models:/ URI)")
    ] = "models:/fedmtl-personalized@champion",
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", help="the coordinator's MLflow tracking store")
    ] = "sqlite:///mlflow/mlflow.db",
    run: Annotated[
        Optional[str],
        typer.Option("--run", help="the training run whose personal heads to use (default: last)"),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 5002,
    register: Annotated[
        Optional[str],
        typer.Option(
            "--register",
            help="also register the personalised model under this name (opt-in: the site's "
            "personal heads then leave it, to the tracking store)",
        ),
    ] = None,
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="build the model, print its folder, and stop")
    ] = False,
) -> None:
    """Serve this site's personalised model: the registered shared model (checked against its
    recorded hashes) with the personal heads this site fitted and kept, over HTTP (MLflow's
    scoring server). Nothing leaves the site unless --register is given."""
    import os
    import shutil
    import sys
    import time

    import torch

    from cli.registry import _load_predictor, _tracking_uri
    from fedmtl.sites.site import SiteError, personal_state, read_site, with_personal

    try:
        name = read_site(folder)["site"]
        used, kept = personal_state(folder, run)
    except SiteError as exc:
        _fail(exc, 2)
    tracking = _tracking_uri(tracking_uri)
    copy = folder / "serving" / f"{used}-{time.strftime('%Y%m%dT%H%M%S')}"
    copy.mkdir(parents=True)
    local, predictor = _load_predictor(model, tracking, into=copy)
    bundle = with_personal(predictor.bundle, name, kept)
    (artifact,) = list(Path(local).rglob("bundle.pt"))
    torch.save(bundle.to_dict(), artifact)
    console.print(f"site '{name}': {model} with its personal heads of run {used} in {local}")
    if register:
        _register_site_model(name, bundle, register, tracking, model)
    if no_serve:
        return
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which(
        "mlflow"
    )
    if mlflow_bin is None:
        _fail(FileNotFoundError("the `mlflow` command is not installed in this environment"), 2)
    console.print(f"serving at http://{host}:{port}/invocations (Ctrl-C stops)")
    sys.stdout.flush()
    args = [mlflow_bin, "models", "serve", "-m", str(local), "--env-manager", "local"]
    os.execv(mlflow_bin, [*args, "--host", host, "--port", str(port)])


def _register_site_model(site: str, bundle, registered: str, tracking: str, model: str) -> None:
    """Logs the site's personalised model to an MLflow run of its own and registers it (opt-in)."""
    import pandas as pd
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    import mlflow
    from models.personalized import CLIENT_COLUMN
    from tasks.registry import log_personalized_model

    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    # the site's experiment keeps its artifacts beside the shared model's (not in ./mlruns)
    name, version = get_model_name_and_version(client, model)
    source = client.get_run(client.get_model_version(name, version).run_id)
    location = client.get_experiment(source.info.experiment_id).artifact_location.rstrip("/")
    title = f"fedmtl-site-{site}"
    experiment = client.get_experiment_by_name(title)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(title, artifact_location=f"{location}/sites/{site}")
    )
    run = client.create_run(
        experiment_id,
        run_name=f"{site}-personalised",
        tags={"site": site, "personal_heads": "included"},
    )
    example = pd.DataFrame(0.0, index=range(2), columns=list(bundle.features))
    example.insert(0, CLIENT_COLUMN, site)  # zeros: never the site's rows
    try:
        uri, version = log_personalized_model(
            run.info.run_id, bundle, example, registered, tags={"site": site}
        )
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    console.print(f"registered {uri} as {registered} version {version} (challenger)")
