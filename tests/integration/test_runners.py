"""Task runners for real: the same training flow on threads, on a process pool and on a Dask
LocalCluster of 2 worker processes gives the same model (every client's randomness is seeded
by seed, round and client, not by where it runs)."""

from __future__ import annotations

import pytest

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.validation import validate_partitions
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
    validate_partitions(cfg.data.partitions_dir, read_manifest(cfg.data.partitions_dir), cfg.validation,
                        cfg.data.validation_dir)
    return root


def train(root, **extra):
    from flows.training import federated_training

    cfg = load_config(None, tiny_overrides(root, **{"tracking.client_runs": False,
                                                    "tracking.register_model": False, **extra}))
    with worker_environment(cfg.runner):
        return with_runner(federated_training, cfg)(cfg.model_dump(mode="json"))


def test_dask_local_cluster_and_process_pool_train_the_same_model_as_threads(prefect_harness, data_root):
    threads = train(data_root)
    dask = train(data_root, **{"runner.kind": "dask", "runner.workers": 2})
    processes = train(data_root, **{"runner.kind": "process", "runner.workers": 2})
    for key in KEYS:
        assert dask[key] == pytest.approx(threads[key], abs=1e-6), key
        assert processes[key] == pytest.approx(threads[key], abs=1e-6), key
    from mlflow.tracking import MlflowClient

    client = MlflowClient(threads["tracking_uri"])
    used = {name: client.get_run(run["mlflow_run_id"]).data.tags["task_runner"]
            for name, run in (("threads", threads), ("dask", dask), ("processes", processes))}
    assert used == {"threads": "ThreadPoolTaskRunner", "dask": "DaskTaskRunner",
                    "processes": "ProcessPoolTaskRunner"}


def test_runner_settings_are_checked():
    from fedmtl.config import ConfigError

    with pytest.raises(ConfigError, match="runner.dask_address is set but runner.kind is 'thread'"):
        load_config(None, ["runner.dask_address=tcp://127.0.0.1:8786"])
    with pytest.raises(ConfigError, match="runner.kind"):
        load_config(None, ["runner.kind=ray"])
    runner = task_runner(load_config(None, ["runner.kind=dask", "runner.dask_address=tcp://10.1.2.3:8786"]).runner)
    assert runner.address == "tcp://10.1.2.3:8786"
    assert issubclass(RunnerError, ValueError)
