"""The Prefect task runner a training flow run uses for its client tasks (``runner`` settings).

- ``thread`` (default): ``ThreadPoolTaskRunner``; tasks share the flow's process, torch's
  kernels release the GIL, nothing is pickled.
- ``process``: ``ProcessPoolTaskRunner``; each task's inputs and result are pickled to and
  from a pool of local processes.
- ``dask``: prefect-dask's ``DaskTaskRunner`` on a ``distributed.LocalCluster`` of
  ``runner.workers`` single-threaded worker processes, or on the scheduler at
  ``runner.dask_address``.
- ``ray``: prefect-ray's ``RayTaskRunner`` on a local Ray instance of ``runner.workers`` CPUs
  (no dashboard, no usage stats, shut down when the flow run ends), or on the cluster at
  ``runner.ray_address``.

Worker processes get ``OMP_NUM_THREADS`` = ``runner.torch_threads`` (default 1), so that
``workers`` processes do not each start one torch thread per core, and the address of this
process's Prefect API: without it, a worker with no ``PREFECT_API_URL`` would start an
ephemeral Prefect server of its own (seconds and hundreds of MiB each, and task runs recorded
in a database nobody reads).
"""

from __future__ import annotations

import logging
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

        return (
            ThreadPoolTaskRunner(max_workers=runner.workers)
            if runner.workers
            else ThreadPoolTaskRunner()
        )
    if runner.kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if runner.kind == "ray":
        return _ray_task_runner(runner, workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RunnerError(
            "runner.kind=dask needs prefect-dask: pip install 'fedmtl[dask]' (make installs it)"
        ) from None
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": worker_env(runner),
        },
    )


def _ray_task_runner(runner: RunnerConfig, workers: int):
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RunnerError("runner.kind=ray needs prefect-ray: pip install 'fedmtl[ray]'") from None
    # quiet and offline: no dashboard, no usage stats (also RAY_USAGE_STATS_ENABLED=0 while the
    # flow runs, worker_environment), workers' output not echoed by this process
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if runner.ray_address:
        # an existing cluster: its nodes may not reach an ephemeral API on this machine's
        # loopback, so they get PREFECT_API_URL only when one is configured
        env = {"OMP_NUM_THREADS": str(runner.torch_threads or 1)}
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        init = {**quiet, "runtime_env": {"env_vars": env}}
        if runner.ray_address == "auto":  # prefect-ray reads "auto" as "start a local one"
            return RayTaskRunner(init_kwargs={**init, "address": "auto"})
        return RayTaskRunner(address=runner.ray_address, init_kwargs=init)
    return RayTaskRunner(
        init_kwargs={
            **quiet,
            "num_cpus": workers,
            "include_dashboard": False,
            "runtime_env": {"env_vars": worker_env(runner)},
        }
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
    torch is unaffected). For ``ray``: ``RAY_USAGE_STATS_ENABLED=0`` (unless set), read when
    the flow run starts Ray."""
    if runner.kind == "ray":
        env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    elif runner.kind == "process":
        env = worker_env(runner)
    else:
        yield
        return
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
