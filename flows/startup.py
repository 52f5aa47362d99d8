"""A faster start for command-line flow runs: the Prefect API boots while the process loads.

Without a configured API, a flow run starts Prefect's ephemeral API (``SubprocessASGIServer``:
a uvicorn subprocess serving ``prefect.server.api.server:create_app``, ~4 s to answer) when
the flow is called, i.e. after ~4 s of imports, and its launcher first imports the whole
server application into the calling process (~1.7 s) only to start that subprocess.

:class:`ApiStart` launches the same subprocess, with the same command line and environment
as Prefect's launcher, as the command's first act, before anything heavy is imported; it
runs on the other core while this process imports torch, MLflow and Prefect, and
:func:`warm_up` pays the process's remaining one-off costs (torch.func's first-call set-up,
MLflow's scan of the installed packages when it logs a model, reading the partitions into the
cache the flow reads from). The flow then runs with ``PREFECT_API_URL`` pointing at it
(:meth:`ApiStart.settings`), and the server stops when the command exits, as the ephemeral
one does. A configured API (``PREFECT_API_URL`` in the environment or the Prefect profile)
is used as is. Nothing here changes what a run computes; any failure leaves the flow run to
start Prefect's own ephemeral API.

:func:`loading` keeps Python's cyclic garbage collector out of the way of the one-off loading:
the ~1 million objects that torch, MLflow, Prefect and pydantic create at import never become
garbage, yet each full collection walks them all (0.1-0.4 s each, ~10 of them in a run of
workload W: ~2 s of its 16 s). It pauses collection while they load and then freezes them
(:func:`gc.freeze`), so that later collections skip them.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Prefect's ephemeral launcher sets these for its server (no UI, ephemeral mode).
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


def _die_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to send it SIGTERM when the command's
    process dies, even by SIGKILL (``atexit`` never runs then), so no server is left orphaned."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ApiStart:
    """A local Prefect API for one command, started before the command's imports."""

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.startup_timeout = startup_timeout

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "ApiStart":
        if os.environ.get("PREFECT_API_URL"):
            return self  # a configured server
        try:
            spec = importlib.util.find_spec("prefect")
            app_dir = Path(spec.origin).parents[1] if spec and spec.origin else None
            if app_dir is None:
                return self
            self.port = _free_port()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(app_dir),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={**os.environ, **SERVER_ENV},
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                # a session of its own: a terminal's Ctrl-C goes to the foreground process
                # group, and must stop the run at a safe point, not kill its API under it
                start_new_session=True,
            )
        except Exception:  # noqa: BLE001 - the flow run starts Prefect's own ephemeral API
            self.process = None
            return self
        atexit.register(self.stop)
        return self

    def _ready(self) -> bool:
        """Wait until the server answers its health check (False: it did not come up)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Run the flow inside this: with ``PREFECT_API_URL`` set to this server, unless the
        Prefect settings name an API of their own or this server did not come up (then the
        flow run does what it would have done without it)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        if self.process is None or PREFECT_API_URL.value() or not self._ready():
            self.stop()
            yield
            return
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Load modules and warm caches inside this: no cyclic collection meanwhile; what was loaded
    is then frozen out of later collections. Garbage cycles made meanwhile are kept until exit
    (the loading makes few), nothing else changes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def warm_up(config: Any, data: bool = True) -> None:
    """One-off costs of a training process, paid while the API boots (best effort).
    ``data``: also read the usable clients' partitions (``fedmtl train``; not when the same
    process is about to write them, as ``fedmtl run`` does)."""
    try:
        from fedmtl.algorithms import get_algorithm
        from fedmtl.client.batched import warm_up as torch_func_warm_up

        if config.training.batched != "off" and get_algorithm(config.algorithm.method).batchable:
            torch_func_warm_up()
    except Exception:  # noqa: BLE001
        pass
    try:  # MLflow maps modules to packages (~1 s) the first time it logs a model
        from mlflow.utils.requirements_utils import _init_modules_to_packages_map

        _init_modules_to_packages_map()
    except Exception:  # noqa: BLE001 - a private helper: gone in some version, nothing lost
        pass
    if data:
        try:
            _prefetch(config)
        except Exception:  # noqa: BLE001
            pass


def _prefetch(config: Any) -> None:
    from fedmtl.client.data import ManifestKey, load_client_data
    from fedmtl.data.manifest import read_manifest
    from fedmtl.data.validation import read_report, usable_clients

    manifest = read_manifest(config.data.partitions_dir)
    clients = usable_clients(manifest, read_report(config.data.validation_dir), 1)
    key = ManifestKey(manifest)
    for client in clients[:4096]:  # the partition cache's size
        load_client_data(config.data.partitions_dir, key, client)
