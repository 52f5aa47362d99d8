"""The Prefect task runner a training flow run uses for its client tasks (``runner`` settings).

- ``thread`` (default): ``ThreadPoolTaskRunner``; tasks share the flow's process, torch's
  kernels release the GIL, nothing is pickled.
- ``process``: ``ProcessPoolTaskRunner``; each task's inputs and result are pickled to and
  from a pool of local processes.
- ``dask``: prefect-dask's ``DaskTaskRunner`` on a ``distributed.LocalCluster`` of
  ``runner.workers`` single-threaded worker processes, or on the scheduler at
  ``runner.dask_address``.

Worker processes get ``OMP_NUM_THREADS`` = ``runner.torch_threads`` (default 1), so that
``workers`` processes do not each start one torch thread per core, and the address of this
process's Prefect API: without it, a worker with no ``PREFECT_API_URL`` would start an
ephemeral Prefect server of its own (seconds and hundreds of MiB each, and task runs recorded
in a database nobody reads).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fedmtl.config import Config, RunnerConfig


class RunnerError(ValueError):
    """A task runner that cannot be made here (a missing package, a bad address)."""


def task_runner(runner: RunnerConfig):
    """The Prefect task runner for these settings."""
    workers = runner.workers or os.cpu_count() or 1
    if runner.kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers) if runner.workers else ThreadPoolTaskRunner()
    if runner.kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RunnerError("runner.kind=dask needs prefect-dask: pip install 'fedmtl[dask]' "
                          "(make installs it)") from None
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None, "env": worker_env(runner)},
    )


def api_url() -> str:
    """This process's Prefect API: ``PREFECT_API_URL``, else the ephemeral server that the
    flow run will use (started now if it is not running yet; it is a per-process singleton)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def worker_env(runner: RunnerConfig) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(runner.torch_threads or 1), "PREFECT_API_URL": api_url()}


@contextmanager
def worker_environment(runner: RunnerConfig) -> Iterator[None]:
    """For ``process``: worker processes inherit the environment at start, so torch's thread
    count and the Prefect API are set here for the time of the flow run (the running process's
    torch is unaffected)."""
    if runner.kind != "process":
        yield
        return
    env = worker_env(runner)
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def with_runner(flow_fn: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
    """``flow_fn`` set to run its tasks on ``cfg.runner``'s task runner."""
    return flow_fn.with_options(task_runner=task_runner(cfg.runner))
