"""The core's arithmetic and invariants, on tiny tensors (milliseconds each)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedmtl.client.store import ClientStore
from fedmtl.config import ConfigError, load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.eval.metrics import summarize, worst_fraction_mean
from fedmtl.federation import Federation, RejectedUpdate, check_update
from fedmtl.rounds import run_rounds
from fedmtl.server.aggregation import global_merge, group_aggregate, weighted_mean
from fedmtl.server.dispatch import clients_for_round
from fedmtl.state import ClientUpdate, ServerState, assign
from tests.conftest import tiny_overrides


def update(client, group, n, base, head):
    return ClientUpdate(client, group, n, torch.tensor(base), {"label": torch.tensor(head)})


def test_weighted_mean_matches_hand_computation():
    v = weighted_mean([torch.tensor([1.0, 0.0]), torch.tensor([4.0, 3.0])], [1, 2])
    assert torch.allclose(v, torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([torch.zeros(2)], [0])


def test_hierarchical_aggregation_by_hand():
    ups = [
        update("a", "g1", 10, [1.0], [2.0]),
        update("b", "g1", 30, [3.0], [6.0]),
        update("c", "g2", 20, [-1.0], [1.0]),
    ]
    groups = group_aggregate(ups)
    # within g1: sample-weighted (10*1 + 30*3) / 40 = 2.5 ; heads (10*2 + 30*6)/40 = 5
    assert groups["g1"].delta_base.item() == pytest.approx(2.5)
    assert groups["g1"].delta_heads["label"].item() == pytest.approx(5.0)
    assert groups["g1"].n_samples == 40 and groups["g1"].clients == ["a", "b"]
    state = ServerState(
        0,
        torch.tensor([0.0]),
        {"g1": {"label": torch.tensor([0.0])}, "g2": {"label": torch.tensor([10.0])}},
        {"label": torch.tensor([5.0])},
    )
    by_samples = global_merge(state, groups, "samples")
    # across groups by samples: (40*2.5 + 20*(-1)) / 60 = 4/3
    assert by_samples.base.item() == pytest.approx(4 / 3)
    assert by_samples.group_heads["g1"]["label"].item() == pytest.approx(5.0)
    assert by_samples.group_heads["g2"]["label"].item() == pytest.approx(11.0)
    assert by_samples.global_heads["label"].item() == pytest.approx(8.0)  # mean of group heads
    assert global_merge(state, groups, "uniform").base.item() == pytest.approx(0.75)
    sqrt = global_merge(state, groups, "sqrt").base.item()
    assert sqrt == pytest.approx((40**0.5 * 2.5 - 20**0.5) / (40**0.5 + 20**0.5))
    assert state.base.item() == 0.0 and by_samples.round == 1  # input state untouched


def test_assign_copies_instead_of_aliasing():
    layer = nn.Linear(2, 1)
    vec = torch.zeros(3)
    assign(layer, vec)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(vec, torch.zeros(3)), "training must never write into the server's vector"
    with pytest.raises(ValueError, match="needs 3"):
        assign(layer, torch.zeros(4))


def test_rejects_non_finite_and_misshapen_updates():
    state = ServerState(
        0, torch.zeros(3), {"0": {"label": torch.zeros(2)}}, {"label": torch.zeros(2)}
    )
    with pytest.raises(RejectedUpdate, match="client 'x'.*NaN"):
        check_update(update("x", "0", 5, [0.0, float("nan"), 0.0], [0.0, 0.0]), state)
    with pytest.raises(RejectedUpdate, match="client 'y'.*shape"):
        check_update(update("y", "0", 5, [0.0, 0.0], [0.0, 0.0]), state)


def test_client_sampling_is_seeded_and_sized():
    clients = [f"c{i}" for i in range(10)]
    assert clients_for_round(clients, 1.0, 0, 3) == clients
    a = clients_for_round(clients, 0.3, 0, 3)
    assert len(a) == 3 and a == clients_for_round(clients, 0.3, 0, 3)
    assert len(clients_for_round(clients, 4, 0, 3)) == 4


def test_summaries():
    records = pd.DataFrame(
        [
            {"client": c, "group": "0", "n_test": n, "variant": v, "task": "label", "accuracy": a}
            for c, n, v, a in [
                ("a", 10, "global", 0.2),
                ("a", 10, "personal", 0.9),
                ("b", 30, "global", 0.6),
                ("b", 30, "personal", 0.7),
            ]
        ]
    )
    s = summarize(records)
    assert s["personal/accuracy/mean"] == pytest.approx(0.8)
    assert s["personal/accuracy/weighted_mean"] == pytest.approx((9 + 21) / 40)
    assert s["global/accuracy/worst10"] == pytest.approx(0.2)
    assert s["personalisation_gain/accuracy"] == pytest.approx(((0.9 - 0.2) + (0.7 - 0.6)) / 2)
    assert worst_fraction_mean(pd.Series([0.1, 0.5, 0.9] * 10), True) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def make(store_dir: str) -> Federation:
        return Federation.from_config(cfg, manifest, ClientStore(root / store_dir))

    return make, manifest


def test_same_seed_same_result_and_personal_heads_stay_on_clients(tiny_federation):
    make, manifest = tiny_federation
    s1, rec1, _ = run_rounds(make("s1"), manifest.client_ids, 2)
    s2, rec2, _ = run_rounds(make("s2"), manifest.client_ids, 2)
    assert torch.equal(s1.base, s2.base)
    pd.testing.assert_frame_equal(rec1, rec2)
    # the server state holds groups and tasks only, never a client's personal head
    assert set(s1.group_heads) == {c.group for c in manifest.clients}
    stored = make("s1").store
    assert stored.clients() == sorted(manifest.client_ids)
    for client in manifest.client_ids:
        personal = stored.load(client).heads["label"]
        for heads in [s1.global_heads, *s1.group_heads.values()]:
            assert not torch.equal(personal, heads["label"])


def test_config_errors_name_the_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="data.partition.scheme.*allowed values.*'iid'"):
        load_config(None, ["data.partition.scheme=bogus"])
    with pytest.raises(ConfigError, match="unknown setting 'training.epochs'.*local_epochs"):
        load_config(None, ["training.epochs=3"])
    with pytest.raises(ConfigError, match="training.lr"):
        load_config(None, ["training.lr=-1"])
    bad = tmp_path / "p.yaml"
    bad.write_text("training:\n  rounds: zero\n")
    with pytest.raises(ConfigError, match="training.rounds"):
        load_config(bad)


def test_cli_rejects_invalid_setting_with_exit_code_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--set", "grouping.weighting=median"])
    assert result.exit_code == 2
    assert "grouping.weighting" in result.output and "'samples'" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_fast_classification_metrics_equal_scikit_learns():
    from fedmtl.eval.metrics import classification_metrics, classification_metrics_sklearn

    rng = np.random.default_rng(0)
    cases = [
        (np.array([0, 0, 1]), np.array([0, 0, 1])),
        (np.array([3]), np.array([5])),
        (np.array([1, 1, 1, 1]), np.array([2, 2, 2, 2])),
        (np.array([0, 1, 2, 9]), np.array([9, 2, 1, 0])),
    ]
    for _ in range(300):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 12))
        cases.append((rng.integers(0, k, n), rng.integers(0, k, n)))
    for y_true, y_pred in cases:
        fast, ref = (
            classification_metrics(y_true, y_pred),
            classification_metrics_sklearn(y_true, y_pred),
        )
        assert fast.keys() == ref.keys()
        for key in ref:
            assert fast[key] == pytest.approx(ref[key], abs=1e-12), (key, y_true, y_pred)


def test_batched_evaluation_equals_each_client_scored_alone():
    from fedmtl.client.data import ClientData
    from fedmtl.data.manifest import TaskSpec
    from fedmtl.eval.metrics import evaluate_clients
    from fedmtl.nn import build_model
    from fedmtl.state import flat

    class Cfg:
        base, hidden, dropout, cnn_channels = "mlp", [8], 0.0, [4]

    tasks = [TaskSpec("label", "classification", [0, 1, 2])]
    torch.manual_seed(0)
    model = build_model(Cfg, 5, tasks)
    base, head = flat(model.base), {"label": flat(model.heads["label"])}
    jobs = []
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        n = 3 + i
        data = ClientData(
            f"c{i}",
            "0",
            torch.zeros(0, 5),
            {"label": torch.zeros(0, dtype=torch.long)},
            torch.randn(n, 5, generator=g),
            {"label": torch.randint(0, 3, (n,), generator=g)},
        )
        personal = {"label": head["label"] + 0.3 * torch.randn(head["label"].shape, generator=g)}
        jobs.append((data, {"global": (base, head), "personal": (base, personal)}))
    together = evaluate_clients(model, jobs, tasks)
    alone = [r for job in jobs for r in evaluate_clients(model, [job], tasks)]
    assert together == alone and len(together) == 12


@pytest.mark.parametrize("secure", [False, True])
def test_pooled_evaluation_equals_the_sample_weighted_client_figures(tiny_federation, secure):
    """Private evaluation: the pooled accuracy from the (securely) summed confusion counts is the
    sample-weighted mean of the clients' own accuracies, and no client's figure comes out."""
    import dataclasses

    make, manifest = tiny_federation
    fed = make("pooled")
    state, _, _ = run_rounds(fed, manifest.client_ids, 1)
    records = pd.DataFrame(fed.evaluate_clients(manifest.client_ids, state))
    private = dataclasses.replace(
        fed,
        privacy=fed.privacy.model_copy(
            update={
                "secure_sum": fed.privacy.secure_sum.model_copy(update={"enabled": secure}),
                "evaluation": fed.privacy.evaluation.model_copy(update={"client_metrics": False}),
            }
        ),
    )
    pooled = private.evaluate_pooled(manifest.client_ids, state)
    assert pooled["evaluation/clients"] == len(manifest.client_ids)
    assert not any(k.endswith(("/mean", "/worst10")) for k in pooled)
    for variant in ("global", "group", "personal"):
        rows = records[records["variant"] == variant]
        weighted = float(np.average(rows["accuracy"], weights=rows["n_test"]))
        assert pooled[f"{variant}/accuracy/pooled"] == pytest.approx(weighted, abs=1e-6)
    gain = pooled["personal/accuracy/pooled"] - pooled["global/accuracy/pooled"]
    assert pooled["personalisation_gain/accuracy/pooled"] == pytest.approx(gain)
    few = dataclasses.replace(
        private, privacy=private.privacy.model_copy(update={"min_group_size": 99})
    )
    assert few.evaluate_pooled(manifest.client_ids, state) == {
        "evaluation/clients": len(manifest.client_ids)
    }


def test_the_client_store_versions_personal_state_by_round(tmp_path):
    from fedmtl.client.store import ClientStore
    from fedmtl.state import PersonalState

    store = ClientStore(tmp_path)

    def state(value):
        return PersonalState({"label": torch.full((3,), float(value))})

    for r in (1, 2, 3, 5):
        store.save("c/../1", state(r), r)
    assert store.load("c/../1").heads["label"][0] == 5
    assert (
        store.load("c/../1", at_most=4).heads["label"][0] == 3
    )  # what a resume from round 4 reads
    assert store.load("c/../1", at_most=0) is None
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].parent == tmp_path  # '../' never leaves the root
    assert sorted(p.name for p in folders[0].glob("*.pt")) == [
        f"personal-r{r:06d}.pt" for r in (2, 3, 5)
    ]
    store.save("C", state(7), 1)
    store.save("c", state(8), 1)  # ids differing only by case keep their own state
    assert store.load("C").heads["label"][0] == 7 and store.load("c").heads["label"][0] == 8
    assert store.clients() == ["C", "c", "c/../1"]


def test_robust_aggregation_survives_sign_flipping_clients_where_the_mean_breaks(tmp_path):
    """20 % of the clients send −10×Δ every round: FedAvg's mean collapses to chance, the
    coordinate median, the trimmed mean and multi-Krum keep the model (fedmtl/server/robust.py)."""
    base = {
        "data.partition.n_clients": 10,
        "data.partition.scheme": "iid",
        "algorithm.method": "fedavg",
        "training.local_epochs": 2,
    }
    cfg = load_config(None, tiny_overrides(tmp_path, **base))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def accuracy(rule: str, attack: dict) -> float:
        c = load_config(
            None, tiny_overrides(tmp_path, **base, **attack, **{"server.aggregator": rule})
        )
        fed = Federation.from_config(c, manifest, ClientStore(tmp_path / f"{rule}-{len(attack)}"))
        _, records, _ = run_rounds(fed, manifest.client_ids, 5)
        honest = records[~records["client"].isin(fed.byzantine)]
        return summarize(honest)["global/accuracy/mean"]

    attack = {"faults.byzantine_fraction": 0.2, "faults.byzantine_attack": "sign_flip"}
    clean = accuracy("mean", {})
    assert accuracy("mean", attack) < 0.3 < clean
    for rule in ("median", "trimmed_mean", "multi_krum"):
        assert accuracy(rule, attack) >= clean - 0.05, rule
