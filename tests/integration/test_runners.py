"""Task runners for real: the same training flow on threads, on a process pool and on a Dask
LocalCluster of 2 worker processes (and on a local Ray instance of 2 CPUs) gives the same model
(every client's randomness is seeded by seed, round and client, not by where it runs)."""

from __future__ import annotations

import sys

import pytest

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from flows.runners import RunnerError, task_runner, with_runner, worker_environment
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
KEYS = ("personal_accuracy", "group_accuracy", "global_accuracy", "personal_f1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runners")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return root


def train(root, **extra):
    from flows.training import federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            root, **{"tracking.client_runs": False, "tracking.register_model": False, **extra}
        ),
    )
    with worker_environment(cfg.runner):
        return with_runner(federated_training, cfg)(cfg.model_dump(mode="json"))


@pytest.fixture(scope="module")
def threads(prefect_harness, data_root):
    """The reference: the same training on the default thread runner (once for the module)."""
    return train(data_root)


def test_dask_local_cluster_and_process_pool_train_the_same_model_as_threads(threads, data_root):
    dask = train(data_root, **{"runner.kind": "dask", "runner.workers": 2})
    processes = train(data_root, **{"runner.kind": "process", "runner.workers": 2})
    for key in KEYS:
        assert dask[key] == pytest.approx(threads[key], abs=1e-6), key
        assert processes[key] == pytest.approx(threads[key], abs=1e-6), key
    from mlflow.tracking import MlflowClient

    client = MlflowClient(threads["tracking_uri"])
    used = {
        name: client.get_run(run["mlflow_run_id"]).data.tags["task_runner"]
        for name, run in (("threads", threads), ("dask", dask), ("processes", processes))
    }
    assert used == {
        "threads": "ThreadPoolTaskRunner",
        "dask": "DaskTaskRunner",
        "processes": "ProcessPoolTaskRunner",
    }


def test_ray_trains_the_same_model_as_threads_and_leaves_no_process(threads, data_root):
    pytest.importorskip("prefect_ray")
    import psutil
    import ray

    on_ray = train(data_root, **{"runner.kind": "ray", "runner.workers": 2})
    for key in KEYS:
        assert on_ray[key] == pytest.approx(threads[key], abs=1e-6), key
    from mlflow.tracking import MlflowClient

    run = MlflowClient(on_ray["tracking_uri"]).get_run(on_ray["mlflow_run_id"])
    assert run.data.tags["task_runner"] == "RayTaskRunner"
    # the Ray workers reported their task runs to the flow's own Prefect API (runtime_env)
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        shards = [
            t
            for t in prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[run.data.tags["prefect_flow_run_id"]])
                )
            )
            if t.task_key.startswith("local_train")
        ]
    assert shards and all(t.state.is_completed() for t in shards)
    assert not ray.is_initialized()
    assert ray_processes(psutil.Process()) == []


def ray_processes(parent) -> list[str]:
    """``parent``'s descendants that are Ray's (gcs_server, raylet, dashboard, workers)."""
    import psutil

    found = []
    for child in parent.children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:  # ended meanwhile
            continue
        if "/ray/" in line or line.startswith("ray::"):
            found.append(line[:120])
    return found


def test_runner_settings_are_checked(monkeypatch):
    from fedmtl.config import ConfigError

    with pytest.raises(ConfigError, match="runner.dask_address is set but runner.kind is 'thread'"):
        load_config(None, ["runner.dask_address=tcp://127.0.0.1:8786"])
    with pytest.raises(ConfigError, match="runner.ray_address is set but runner.kind is 'dask'"):
        load_config(None, ["runner.kind=dask", "runner.ray_address=auto"])
    with pytest.raises(ConfigError, match="runner.kind"):
        load_config(None, ["runner.kind=spark"])
    runner = task_runner(
        load_config(None, ["runner.kind=dask", "runner.dask_address=tcp://10.1.2.3:8786"]).runner
    )
    assert runner.address == "tcp://10.1.2.3:8786"
    assert issubclass(RunnerError, ValueError)
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if prefect-ray were not installed
    with pytest.raises(
        RunnerError, match=r"runner.kind=ray needs prefect-ray: pip install 'fedmtl\[ray\]'"
    ):
        task_runner(load_config(None, ["runner.kind=ray"]).runner)


def test_ray_runner_settings():
    pytest.importorskip("prefect_ray")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = "http://127.0.0.1:4200/api"
    with temporary_settings({PREFECT_API_URL: api}):
        local = task_runner(
            load_config(
                None, ["runner.kind=ray", "runner.workers=3", "runner.torch_threads=2"]
            ).runner
        )
        remote = task_runner(
            load_config(None, ["runner.kind=ray", "runner.ray_address=ray://10.1.2.3:10001"]).runner
        )
    assert local.address is None
    assert local.init_kwargs["num_cpus"] == 3 and local.init_kwargs["include_dashboard"] is False
    assert local.init_kwargs["runtime_env"]["env_vars"] == {
        "OMP_NUM_THREADS": "2",
        "PREFECT_API_URL": api,
    }
    assert remote.address == "ray://10.1.2.3:10001" and "num_cpus" not in remote.init_kwargs
    assert remote.init_kwargs["runtime_env"]["env_vars"] == {
        "OMP_NUM_THREADS": "1",
        "PREFECT_API_URL": api,
    }
