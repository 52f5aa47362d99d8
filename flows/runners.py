"""The Prefect task runner a training flow run uses for its client tasks (``runner`` settings).

- ``thread`` (default): ``ThreadPoolTaskRunner``; tasks share the flow's process, torch's
  kernels release the GIL, nothing is pickled.
- ``process``: ``ProcessPoolTaskRunner``; each task's inputs and result are pickled to and
  from a pool of local processes.
- ``dask``: prefect-dask's ``DaskTaskRunner`` on a ``distributed.LocalCluster`` of
  ``runner.workers`` single-threaded worker processes, or on the scheduler at
  ``runner.dask_address``.

Worker processes get ``OMP_NUM_THREADS`` = ``runner.torch_threads`` (default 1), so that
``workers`` processes do not each start one torch thread per core.
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
    threads = str(runner.torch_threads or 1)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None, "env": {"OMP_NUM_THREADS": threads}},
    )


@contextmanager
def worker_environment(runner: RunnerConfig) -> Iterator[None]:
    """For ``process``: worker processes inherit the environment at start, so torch's thread
    count is set here for the time of the flow run (the running process's torch is unaffected)."""
    if runner.kind != "process":
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(runner.torch_threads or 1)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def with_runner(flow_fn: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
    """``flow_fn`` set to run its tasks on ``cfg.runner``'s task runner."""
    return flow_fn.with_options(task_runner=task_runner(cfg.runner))
