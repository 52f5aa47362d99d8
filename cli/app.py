"""The typer app and what every command group shares: the ``data`` sub-app, the consoles,
the common options, settings loading, failing with an exit code, the tracking-server check,
and ``main`` (the ``fedmtl`` command). The commands live in the group modules beside this one
(``cli.data``, ``cli.train``, ``cli.registry``, ``cli.personalize``, ``cli.tracking``,
``cli.schedule``); ``cli/__init__.py`` imports them in the order ``fedmtl --help`` lists them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cli import __doc__ as HELP  # the package's docstring (exit codes) is the app's help
from fedmtl.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode="markdown"
)
data_app = typer.Typer(
    no_args_is_help=True, help="The data pipeline's stages (what dvc.yaml runs)."
)
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="parameter file (DVC's params.yaml)")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a setting: key=value (repeatable)"),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="show Prefect's and libraries' logs")
]


def _config(params: Path, overrides: list[str] | None) -> Config:
    try:
        return load_config(
            params if params.exists() or str(params) != "params.yaml" else None, overrides
        )
    except ConfigError as exc:
        _fail(exc, 2)
    raise AssertionError("unreachable")


def _fail(exc: BaseException, code: int = 1) -> None:
    from rich.markup import escape  # ids and values in messages are text, not markup

    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code) from None


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
        _fail(
            ConfigError(
                f"{setting} = '{uri}': the MLflow tracking server cannot be reached "
                f"({host}:{port}: {reason}); start it, or set {setting} to a reachable "
                "server or a sqlite:/// store"
            ),
            2,
        )


def _own_errors(verbose: bool) -> None:
    """The command reports a failed flow run itself (one line, the cause): unless --verbose,
    Prefect's engine does not print its traceback as well."""
    if not verbose:
        import logging

        class EngineFailures(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                text = record.getMessage()
                return not text.startswith(
                    (
                        "Encountered exception during execution",
                        "Task run failed with exception",
                        "Finished in state Failed",
                    )
                )

        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(type(f).__name__ == "EngineFailures" for f in logger.filters):
                logger.addFilter(EngineFailures())


DEFAULT_TRACKING = "sqlite:///mlflow/mlflow.db"


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
