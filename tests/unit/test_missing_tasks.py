"""Clients that differ in their tasks (data.partition.missing_tasks, optional tasks): a client
without a task's labels trains the heads it has, shares the base, leaves that task's head be and
is not scored on it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedmtl.client.data import MISSING_CLASS, PartitionInvalid, load_client_data
from fedmtl.client.store import ClientStore
from fedmtl.client.training import multitask_loss
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.validation import validate_partitions
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from fedmtl.server.aggregation import group_aggregate
from fedmtl.state import ClientUpdate
from tests.conftest import tiny_overrides


def _settings(root: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        root,
        **{
            "data.source": "synthetic",
            "data.synthetic.n_clients": 8,
            "data.synthetic.n_tasks": 3,
            "data.partition.missing_tasks": 0.5,
            "model.hidden": "[16]",
            **extra,
        },
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing-tasks")
    cfg = load_config(None, _settings(root))
    prepare(cfg.data)
    raw = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(cfg.data.raw_dir).iterdir()
        if p.is_file()
    }
    manifest = partition(cfg.data)
    return root, cfg, manifest, raw


def _without(cfg, manifest, task: str) -> list[str]:
    out = []
    for c in manifest.client_ids:
        data = load_client_data(cfg.data.partitions_dir, manifest, c)
        if bool((data.y_train[task] == MISSING_CLASS).all()):
            out.append(c)
    return out


def test_partition_drops_whole_tasks_for_a_fraction_of_clients(made):
    root, cfg, manifest, raw = made
    assert [t.optional for t in manifest.tasks] == [False, True, True]  # the first: never
    for task in ("label_1", "label_2"):
        lacking = _without(cfg, manifest, task)
        assert len(lacking) == 4, (task, lacking)  # half of the 8 clients
        for c in lacking:  # no label in either split, and the other tasks still there
            data = load_client_data(cfg.data.partitions_dir, manifest, c)
            assert bool((data.y_test[task] == MISSING_CLASS).all())
            assert bool((data.y_train["label"] != MISSING_CLASS).all())
    # the draw is the seed's, and the raw data is never modified
    again = load_config(None, _settings(root))
    assert _without(cfg, partition(again.data), "label_1") == _without(cfg, manifest, "label_1")
    after = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(cfg.data.raw_dir).iterdir()
        if p.is_file()
    }
    assert after == raw
    # great expectations: nulls are allowed in an optional task's column, nowhere else
    report = validate_partitions(
        cfg.data.partitions_dir, manifest, cfg.validation, root / "validation"
    )
    assert set(report.passed) == set(manifest.client_ids), report.quarantined


def test_a_required_tasks_missing_label_is_refused_naming_client_task_and_file(made, tmp_path):
    _, cfg, manifest, _ = made
    client = manifest.clients[0]
    frame = pd.read_parquet(Path(cfg.data.partitions_dir) / client.file)
    frame["label"] = frame["label"].astype("Int64")
    frame.loc[2, "label"] = pd.NA
    parts = tmp_path / "parts"
    parts.mkdir()
    frame.to_parquet(parts / client.file)
    with pytest.raises(PartitionInvalid) as err:
        load_client_data(parts, manifest, client.client)
    message = str(err.value)
    assert client.client in message and "'label'" in message and client.file in message
    assert "optional" in message


def test_the_loss_skips_missing_labels_and_a_task_nobody_holds_adds_nothing():
    tasks = [TaskSpec("a", "classification", [0, 1, 2]), TaskSpec("r", "regression", optional=True)]
    tasks[0] = TaskSpec("a", "classification", [0, 1, 2], optional=True)
    out_a = torch.randn(4, 3, requires_grad=True)
    out_r = torch.randn(4, 1, requires_grad=True)
    y_a = torch.tensor([0, MISSING_CLASS, 2, MISSING_CLASS])
    y_r = torch.tensor([0.5, float("nan"), float("nan"), 1.0])
    loss = multitask_loss({"a": out_a, "r": out_r}, {"a": y_a, "r": y_r}, tasks)
    have_a, have_r = y_a != MISSING_CLASS, torch.isfinite(y_r)
    expected = (
        torch.nn.functional.cross_entropy(out_a[have_a], y_a[have_a])
        + ((out_r[have_r, 0] - y_r[have_r]) ** 2).mean()
    )
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(out_r.grad).all() and bool((out_r.grad[~have_r] == 0).all())
    assert bool((out_a.grad[~have_a] == 0).all())
    # a batch where no row holds task r's label: r adds 0, and no NaN anywhere
    none = multitask_loss(
        {"a": out_a, "r": out_r}, {"a": y_a, "r": torch.full((4,), float("nan"))}, tasks
    )
    assert torch.isfinite(none) and torch.allclose(
        none, torch.nn.functional.cross_entropy(out_a[have_a], y_a[have_a])
    )


def test_a_head_is_averaged_over_the_clients_that_hold_its_labels():
    def update(client, delta, task_samples):
        return ClientUpdate(
            client,
            "g",
            10,
            torch.full((2,), delta),
            {"a": torch.full((3,), delta), "b": torch.full((3,), delta)},
            task_samples=task_samples,
        )

    both = update("c1", 1.0, None)
    only_a = update("c2", 3.0, {"a": 10, "b": 0})
    agg = group_aggregate([both, only_a])["g"]
    assert torch.allclose(agg.delta_base, torch.full((2,), 2.0))  # every client: the base
    assert torch.allclose(agg.delta_heads["a"], torch.full((3,), 2.0))
    assert torch.allclose(agg.delta_heads["b"], torch.full((3,), 1.0))  # not halved by c2
    assert agg.task_samples == {"a": 20, "b": 10}
    nobody = group_aggregate([update("c3", 5.0, {"a": 10, "b": 0})])["g"]
    assert torch.equal(nobody.delta_heads["b"], torch.zeros(3))  # no labels: no change


@pytest.mark.parametrize("method", ["fedmtl", "fedavg"])
def test_a_run_trains_the_heads_clients_have_and_scores_only_those(made, tmp_path, method):
    _, cfg, manifest, _ = made
    run_cfg = load_config(None, _settings(tmp_path, **{"algorithm.method": method}))
    run_cfg = run_cfg.model_copy(update={"data": cfg.data})
    fed = Federation.from_config(run_cfg, manifest, ClientStore(tmp_path / "store"))
    state0 = fed.initial_state()
    state, records, history = run_rounds(fed, manifest.client_ids, 2, state=state0)
    lacking = set(_without(cfg, manifest, "label_1"))
    scored = set(records[records["task"] == "label_1"]["client"])
    assert scored == set(manifest.client_ids) - lacking  # not scored where it has no labels
    assert set(records[records["task"] == "label"]["client"]) == set(manifest.client_ids)
    final = history[-1]
    assert final["label_1/personal/accuracy/mean"] > 0.5  # trained by the clients that have it
    heads = state.global_heads["label_1"]
    assert not torch.equal(heads, state0.global_heads["label_1"])
    assert all(torch.isfinite(v).all() for v in state.global_heads.values())


def test_settings_that_cannot_skip_missing_labels_are_refused(made, tmp_path):
    _, cfg, manifest, _ = made
    for extra, why in (
        ({"algorithm.method": "gpfl", "tracking.register_model": "false"}, "gpfl"),
        ({"server.aggregator": "median"}, "median"),
        ({"algorithm.method": "fedrod", "tracking.register_model": "false"}, "fedrod"),
    ):
        run_cfg = load_config(None, _settings(tmp_path, **extra))
        with pytest.raises(ValueError, match="label_1") as err:
            Federation.from_config(run_cfg, manifest, ClientStore(tmp_path / "s"))
        assert why in str(err.value)


@pytest.mark.parametrize("protocol", ["secagg", "ckks"])
def test_the_secure_sum_weighs_each_head_by_the_rows_that_hold_its_labels(protocol):
    """The secure sum gives the plain release's per-task means: each head over the clients that
    hold its labels (their counts travel in the masked vector, at most a client's rows), a head
    nobody holds does not move, and the weights come back as the head's rows."""
    from fedmtl.config import PrivacyConfig
    from fedmtl.privacy.aggregation import private_aggregate

    gen = torch.Generator().manual_seed(0)

    def update(client, n, task_samples):
        return ClientUpdate(
            client,
            "g",
            n,
            torch.randn(5, generator=gen) * 0.1,
            {t: torch.randn(4, generator=gen) * 0.1 for t in ("a", "b", "c")},
            task_samples=task_samples,
        )

    ups = [
        update("c1", 10, {"a": 10, "b": 10, "c": 0}),
        update("c2", 20, {"a": 20, "b": 0, "c": 0}),
        update("c3", 30, {"a": 30, "b": 5, "c": 0}),
        update("c4", 40, {"a": 40, "b": 400, "c": 0}),  # claims more rows than it has: 40
    ]
    plain = group_aggregate(ups)["g"]
    spec = PrivacyConfig(secure_sum={"enabled": True, "protocol": protocol})
    secure, _ = private_aggregate(
        ups, spec, 1.0, {}, 40.0, torch.Generator().manual_seed(1), seed=3, partial=True
    )
    got = secure["g"]
    assert torch.allclose(got.delta_base, plain.delta_base, atol=1e-5)
    clamped = [u.samples_for("b") for u in ups[:3]] + [40]
    want_b = sum(w * u.delta_heads["b"] for w, u in zip(clamped, ups)) / sum(clamped)
    assert torch.allclose(got.delta_heads["b"], want_b, atol=1e-5)  # not pulled to 0 by c2
    assert torch.allclose(got.delta_heads["a"], plain.delta_heads["a"], atol=1e-5)
    assert torch.equal(got.delta_heads["c"], torch.zeros(4))  # nobody holds c: no change
    assert got.task_samples == {"a": 100, "b": 55, "c": 0}


@pytest.mark.parametrize(
    "extra",
    [
        {"privacy.secure_sum.enabled": "true"},
        {"privacy.dp_fedavg.enabled": "true", "privacy.dp_fedavg.noise_multiplier": "0.3"},
    ],
    ids=["secure-sum", "dp-fedavg"],
)
def test_private_runs_train_the_heads_clients_have(made, tmp_path, extra):
    _, cfg, manifest, _ = made
    run_cfg = load_config(
        None, _settings(tmp_path, **{"privacy.min_group_size": "2", **extra})
    ).model_copy(update={"data": cfg.data})
    fed = Federation.from_config(run_cfg, manifest, ClientStore(tmp_path / "store"))
    state0 = fed.initial_state()
    state, _, history = run_rounds(fed, manifest.client_ids, 2, state=state0)
    for task in ("label", "label_1", "label_2"):
        assert not torch.equal(state.global_heads[task], state0.global_heads[task])
        assert torch.isfinite(state.global_heads[task]).all()
    assert history[-1]["label_1/personal/accuracy/mean"] > 0.5


def test_a_users_table_with_a_partly_empty_label_column_makes_that_task_optional(tmp_path):
    """Bring-your-own data: a later label column with empty cells (clients or rows without that
    task) is an optional task; the run trains on what each client has."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c in range(4):
        x = torch.randn(40, 4, generator=gen)
        for i in range(40):
            smoker = None if c >= 2 or (c == 0 and i == 5) else int(x[i, 1] > 0)
            rows.append(
                {
                    "site": f"h{c}",
                    **{f"f{j}": float(x[i, j]) for j in range(4)},
                    "label": int(x[i, 0] > 0) + int(x[i, 2] > 1),
                    "smoker": smoker,
                }
            )
    path = tmp_path / "table.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = load_config(
        None,
        _settings(
            tmp_path,
            **{
                "data.source": "table",
                "data.table.path": str(path),
                "data.table.client_column": "site",
                "data.table.label_columns": '["label", "smoker"]',
                "data.partition.missing_tasks": 0.0,
            },
        ),
    )
    prepare(cfg.data)
    manifest = partition(cfg.data)
    assert [(t.name, t.optional) for t in manifest.tasks] == [("label", False), ("smoker", True)]
    assert manifest.tasks[1].classes == [0, 1]
    report = validate_partitions(cfg.data.partitions_dir, manifest, cfg.validation, tmp_path / "v")
    assert set(report.passed) == set(manifest.client_ids), report.quarantined
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    _, records, history = run_rounds(fed, manifest.client_ids, 1)
    assert set(records[records["task"] == "smoker"]["client"]) == {"h0", "h1"}
    assert 0 <= history[-1]["smoker/personal/accuracy/mean"] <= 1


def test_a_client_cannot_weigh_more_on_a_head_than_its_rows(made, tmp_path):
    """Bounded influence: the per-task counts a client reports are clamped to its train rows as
    the manifest records them (as its overall weight is)."""
    _, cfg, manifest, _ = made
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    client = manifest.clients[0]
    liar = ClientUpdate(
        client.client,
        "0",
        10**9,
        None,
        {"label": torch.zeros(3)},
        task_samples={"label": 10**9, "label_1": -5},
    )
    kept, refused = fed.screen([liar])
    assert not refused and kept[0].n_samples == client.n_train
    assert kept[0].task_samples == {"label": client.n_train, "label_1": 0}


def test_learned_groups_cluster_on_the_heads_every_client_trained(made, tmp_path):
    """grouping: cluster with optional tasks: a client without a task's labels has an unmoved
    head there; the clustering looks at the heads every client trained, so two true groups are
    found whichever of their members lack a task, and a group head is averaged over the members
    that hold its labels."""
    from fedmtl.server.grouping import GroupingSpec, regroup

    _, cfg, manifest, _ = made
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    state = fed.initial_state()
    gen = torch.Generator().manual_seed(0)
    directions = {g: torch.randn(state.global_heads["label"].numel(), generator=gen) for g in "ab"}
    updates = []
    for i in range(8):
        group = "ab"[i % 2]
        lacks = i < 4  # the first four lack label_1 and label_2
        heads = {
            t: torch.zeros_like(v) if (lacks and t != "label") else 3.0 * torch.randn(v.shape)
            for t, v in state.global_heads.items()
        }
        heads["label"] = directions[group] + 0.05 * torch.randn(heads["label"].shape)
        samples = {"label": 50, "label_1": 0, "label_2": 0} if lacks else None
        updates.append(ClientUpdate(f"c{i}", "all", 50, None, heads, task_samples=samples))
    regrouped, score = regroup(state, state, updates, GroupingSpec("cluster", 2, 0, 0.1))
    found = {u.client: regrouped.assignment[u.client] for u in updates}
    assert len(set(found.values())) == 2 and score > 0.5
    for i in range(2, 8):
        assert found[f"c{i}"] == found[f"c{i % 2}"], found  # by true group, not by missing task
    # a group head of label_1: the mean of the members that hold it, not pulled to zero
    members = [u for u in updates if found[u.client] == found["c4"]]
    holding = [u for u in members if u.task_samples is None]
    expected = state.global_heads["label_1"] + torch.stack(
        [u.delta_heads["label_1"] for u in holding]
    ).mean(0)
    assert torch.allclose(regrouped.heads_for(found["c4"])["label_1"], expected, atol=1e-6)
