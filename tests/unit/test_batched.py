"""Batched local training (fedmtl/client/batched.py) gives each client what the per-client loop
gives."""

from __future__ import annotations

import math
import types

import numpy as np
import pandas as pd
import pytest
import torch

import fedmtl.federation.clients as federation
from fedmtl.client.batched import BatchingUnsupported, SharedJob, train_shared
from fedmtl.client.data import ClientData
from fedmtl.client.store import ClientStore
from fedmtl.client.training import LocalConfig, train_joint
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import TaskSpec, read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from fedmtl.server.dispatch import MIN_CLIENTS_PER_TASK, shards
from fedmtl.state import flat
from models import build_model
from tests.conftest import tiny_overrides, with_settings

PARAM_TOL = 1e-5  # reached: ~1e-7 (float32 summation order); losses ~1e-7 relative
LOSS_RTOL = 1e-6
#: rows per client (before the 25 % test split): smaller than a batch, about one batch, several
SIZES = {"a": 5, "b": 22, "c": 24, "d": 64, "e": 120, "f": 12}


@pytest.fixture(scope="module")
def table_fed(tmp_path_factory):
    """A table federation: unequal clients, two groups, a classification and a regression task."""
    root = tmp_path_factory.mktemp("batched")
    rng = np.random.default_rng(0)
    frames = []
    for i, (client, n) in enumerate(SIZES.items()):
        x = rng.normal(0.3 * (i % 3), 1.0, (n, 5))
        frames.append(
            pd.DataFrame(
                {
                    "client": client,
                    "region": "north" if i % 2 else "south",
                    **{f"x{j}": x[:, j] for j in range(5)},
                    "label": rng.integers(0, 3, n),
                    "score": 0.5 * (x[:, 0] - x[:, 1]) + rng.normal(0, 0.1, n),
                }
            )
        )
    path = root / "table.csv"
    pd.concat(frames).to_csv(path, index=False)
    cfg = load_config(
        None,
        tiny_overrides(
            root,
            **{
                "data.source": "table",
                "data.table.path": str(path),
                "data.table.group_column": "region",
                "data.table.label_columns": "[label, score]",
                "data.table.task_kinds": "{score: regression}",
                "training.local_epochs": 3,
                "training.batch_size": 16,
                "training.lr": 0.05,
            },
        ),
    )
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    counter = iter(range(10_000))

    def make(method: str = "fedmtl", batched: str = "auto", **overrides) -> Federation:
        c = with_settings(
            cfg, {"algorithm.method": method, "training.batched": batched, **overrides}
        )
        return Federation.from_config(c, manifest, ClientStore(root / f"store{next(counter)}"))

    return make, manifest


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = federation.train_shared

    def spy(model, tasks, cfg, jobs, epochs=None):
        calls.append(len(jobs))
        return real(model, tasks, cfg, jobs, epochs)

    monkeypatch.setattr(federation, "train_shared", spy)
    return calls


def assert_same_updates(batched, loop):
    assert [u.client for u in batched] == [u.client for u in loop]
    for b, s in zip(batched, loop):
        assert (b.group, b.n_samples, set(b.metrics)) == (s.group, s.n_samples, set(s.metrics))
        assert (b.delta_base is None) == (s.delta_base is None)
        assert torch.allclose(b.delta_base, s.delta_base, rtol=0, atol=PARAM_TOL)
        assert set(b.delta_heads) == set(s.delta_heads)
        for t in s.delta_heads:
            assert b.delta_heads[t].shape == s.delta_heads[t].shape
            assert torch.allclose(b.delta_heads[t], s.delta_heads[t], rtol=0, atol=PARAM_TOL)
        assert b.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize("method", ["fedavg", "fedmtl"])
@pytest.mark.parametrize("hidden", [[], [8]], ids=["mlr", "mlp"])
@pytest.mark.parametrize(
    "mu,momentum,decay",
    [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.3, 0.9, 0.01)],
    ids=["sgd", "prox", "prox-momentum-decay"],
)
def test_batched_updates_equal_the_per_client_loop(
    table_fed, monkeypatch, method, hidden, mu, momentum, decay
):
    make, manifest = table_fed
    settings = {
        "model.hidden": hidden,
        "algorithm.prox_mu": mu,
        "training.momentum": momentum,
        "training.weight_decay": decay,
    }
    loop_fed, batched_fed = make(method, "off", **settings), make(method, "on", **settings)
    clients = manifest.client_ids
    n_train = {c: batched_fed.data(c).n_train for c in clients}
    assert min(n_train.values()) < 16 and max(n_train.values()) > 3 * 16  # sizes as intended
    state = loop_fed.initial_state()
    if method == "fedmtl":  # distinct group heads, so each client must start from its own
        state.group_heads["north"] = {t: v + 0.1 for t, v in state.group_heads["north"].items()}
    calls = _spy(monkeypatch)
    batched = batched_fed.train_clients(clients, state)
    assert calls == [len(clients)], "the batched path must have trained every client at once"
    loop = loop_fed.train_clients(clients, state)
    assert calls == [len(clients)]
    assert_same_updates(batched, loop)
    assert (
        loop_fed.store.clients() == batched_fed.store.clients()
    )  # no personal state on either path


def test_engine_matches_train_joint_including_an_empty_client():
    tasks = [TaskSpec("label", "classification", [0, 1, 2]), TaskSpec("score", "regression")]
    spec = types.SimpleNamespace(base="mlp", hidden=[6, 4], dropout=0.0, cnn_channels=[4])
    cfg = LocalConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.5)
    jobs = []
    for i, n in enumerate([0, 3, 8, 9, 30]):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(n, 7, generator=g)
        y = {"label": torch.randint(0, 3, (n,), generator=g), "score": torch.randn(n, generator=g)}
        torch.manual_seed(i)
        m = build_model(spec, 7, tasks)
        jobs.append(
            SharedJob(
                ClientData(f"c{i}", "0", x, y, x[:0], {}),
                flat(m.base),
                {t: flat(h) for t, h in m.heads.items()},
                torch.Generator().manual_seed(50 + i),
                0.2,
            )
        )
    model = build_model(spec, 7, tasks)
    got = train_shared(model, tasks, cfg, jobs)
    for i, job in enumerate(jobs):
        base, heads, loss = train_joint(
            model,
            job.base,
            job.heads,
            job.data,
            tasks,
            cfg,
            torch.Generator().manual_seed(50 + i),
            cfg.epochs,
            prox_mu=0.2,
        )
        assert torch.allclose(got[i][0], base, rtol=0, atol=PARAM_TOL)
        for t in heads:
            assert torch.allclose(got[i][1][t], heads[t], rtol=0, atol=PARAM_TOL)
        if job.data.n_train == 0:
            assert math.isnan(loss) and math.isnan(got[i][2])
            assert torch.equal(got[i][0], job.base)  # an empty client does not move
        else:
            assert got[i][2] == pytest.approx(loss, rel=LOSS_RTOL)


def test_run_rounds_batched_and_per_client_reach_the_same_metrics(table_fed):
    make, manifest = table_fed
    results = {}
    for mode in ("on", "off"):
        fed = make("fedmtl", mode, **{"model.hidden": [8], "algorithm.personal_fit": "sgd"})
        state, _, history = run_rounds(fed, manifest.client_ids, rounds=3)
        results[mode] = (state, history[-1])
    (s_on, h_on), (s_off, h_off) = results["on"], results["off"]
    assert set(h_on) == set(h_off)
    for key in h_off:
        if isinstance(h_off[key], float) and not math.isnan(h_off[key]):
            assert h_on[key] == pytest.approx(h_off[key], abs=1e-4), key
    assert torch.allclose(s_on.base, s_off.base, rtol=0, atol=1e-4)


def test_batched_on_names_the_method_or_model_that_cannot_batch(table_fed):
    make, manifest = table_fed
    clients = manifest.client_ids[:2]
    state = make("ditto").initial_state()
    with pytest.raises(BatchingUnsupported, match="'ditto'"):
        make("ditto", "on").train_clients(clients, state)
    assert len(make("ditto", "auto").train_clients(clients, state)) == 2  # auto: the loop
    dropout = make("fedavg", "on", **{"model.dropout": 0.2})
    with pytest.raises(BatchingUnsupported, match="dropout"):
        dropout.train_clients(clients, dropout.initial_state())
    assert (
        make("fedavg-ft").uses_batching()
        and make("fedavg", **{"algorithm.prox_mu": 1.0}).uses_batching()
    )
    assert not make("fedavg", "off").uses_batching()


def test_a_failing_client_is_reported_not_fatal_when_asked(table_fed):
    make, manifest = table_fed
    fed = make("fedavg", "on")
    state = fed.initial_state()
    failed: dict[str, str] = {}
    updates = fed.train_clients(["nobody", *manifest.client_ids[:2]], state, failed)
    assert [u.client for u in updates] == manifest.client_ids[:2] and list(failed) == ["nobody"]
    with pytest.raises(KeyError):
        fed.train_clients(["nobody"], state)


def test_shard_task_trains_its_clients(table_fed):
    from tasks.round import local_train_shard

    make, manifest = table_fed
    fed = make("fedmtl")
    state = fed.initial_state()
    updates, failed = local_train_shard.fn(manifest.client_ids, fed, state)
    assert failed == {}
    assert_same_updates(updates, make("fedmtl", "off").train_clients(manifest.client_ids, state))


@pytest.mark.parametrize(
    "n,per_task,workers,sizes",
    [
        (0, None, 4, []),
        (5, None, 4, [5]),  # never below MIN_CLIENTS_PER_TASK: one shard
        (20, None, 4, [10, 10]),  # 4 shards would hold 5 < MIN_CLIENTS_PER_TASK: 20 // 8 = 2 shards
        (100, None, 2, [50, 50]),  # one shard per worker
        (101, None, 2, [51, 50]),
        (1000, None, 8, [125] * 8),
        (1001, None, 3, [334, 334, 333]),
        (10, 3, 8, [3, 3, 3, 1]),  # clients_per_task given: that many, the last smaller
    ],
)
def test_shards_cover_every_client_once_in_order(n, per_task, workers, sizes):
    clients = [f"c{i:04d}" for i in range(n)]
    got = shards(clients, per_task, workers)
    assert [len(s) for s in got] == sizes
    assert [c for s in got for c in s] == clients
    if per_task is None and n >= MIN_CLIENTS_PER_TASK:
        assert min(len(s) for s in got) >= MIN_CLIENTS_PER_TASK
    with pytest.raises(ValueError, match="clients_per_task"):
        shards(clients or ["x"], 0)


def test_shards_balanced_by_rows_keep_the_order_and_even_out_the_heaviest():
    rows = dict(zip([f"c{i:02d}" for i in range(30)], [300 + (37 * i) % 140 for i in range(30)]))
    clients = list(rows)
    plain = shards(clients, None, 2)
    balanced = shards(clients, None, 2, rows)
    assert sorted(c for s in balanced for c in s) == clients  # every client once
    assert all(s == sorted(s) for s in balanced)  # in the input order within a shard
    heaviest = max(sum(rows[c] for c in s) for s in balanced)
    assert heaviest <= sum(rows.values()) / 2 + max(rows.values())  # the LPT bound
    assert heaviest < max(sum(rows[c] for c in s) for s in plain)
    # one very large client: it trains on its own, the others share the rest
    rows["c00"] = 100_000
    assert shards(clients, None, 2, rows)[0] == ["c00"]
    assert shards(clients, 3, 2, rows) == [
        clients[i : i + 3] for i in range(0, 30, 3)
    ]  # clients_per_task: as given
