"""FedALA and FedDBE: each method's defining property on small cases, and a few rounds of each
through the federation, with one task (digits) and with two (a classification and a regression
task)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.algorithms.fedala import WEIGHTS, FedALA
from fedmtl.algorithms.feddbe import MEAN, PRBM, FedDBE
from fedmtl.client.store import ClientStore
from fedmtl.client.training import load_weights, multitask_loss, train_joint
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from fedmtl.state import PersonalState
from tests.conftest import tiny_overrides, with_settings


def _federations(root, overrides: dict):
    cfg = load_config(None, tiny_overrides(root, **overrides))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def make(algorithm, store: str) -> Federation:
        c = with_settings(cfg, {"algorithm.method": "fedavg"})
        fed = Federation.from_config(c, manifest, ClientStore(root / store))
        return dataclasses.replace(fed, algorithm=algorithm)

    return make, manifest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return _federations(tmp_path_factory.mktemp("ala-dbe"), {})


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A table federation of four clients with a classification and a regression task."""
    root = tmp_path_factory.mktemp("ala-dbe-table")
    rng = np.random.default_rng(0)
    frames = []
    for i, n in enumerate([40, 60, 30, 80]):
        x = rng.normal(0.5 * i, 1.0, (n, 4))
        frames.append(
            pd.DataFrame(
                {
                    "client": f"c{i}",
                    **{f"x{j}": x[:, j] for j in range(4)},
                    "label": (x[:, 0] + x[:, 1] > 0.5 * i).astype(int) + (x[:, 2] > 0),
                    "score": x[:, 0] - x[:, 3] + rng.normal(0, 0.1, n),
                }
            )
        )
    path = root / "table.csv"
    pd.concat(frames).to_csv(path, index=False)
    overrides = {
        "data.source": "table",
        "data.table.path": str(path),
        "data.table.label_columns": "[label, score]",
        "data.table.task_kinds": "{score: regression}",
        "training.local_epochs": 2,
        "training.lr": 0.05,
    }
    return _federations(root, overrides)


def _client(fed: Federation, round_: int = 0):
    client = fed.manifest.client_ids[0]
    return client, fed.context(client, round_), fed.data(client)


def _loss(model, base, heads, x, y, tasks) -> float:
    load_weights(model, base, heads)
    model.eval()
    with torch.no_grad():
        return float(multitask_loss(model(x), y, tasks))


# FedALA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ala_after_one_round(digits):
    """A FedALA federation after one round, and the first client's local model: the one it kept
    (trained from the initial global model), trained 19 epochs more so that it clearly differs
    from the new global model."""
    make, manifest = digits
    fed = make(FedALA(), "ala")
    state, _, _ = run_rounds(fed, manifest.client_ids, 1, evaluate_every=0)
    client, ctx, data = _client(fed)
    personal = fed.store.load(client)
    assert WEIGHTS not in personal.extra  # no ALA yet: it started from the global model
    base, heads, _ = train_joint(
        ctx.model, personal.base, personal.heads, data, ctx.tasks, fed.local, ctx.generator, 19
    )
    return fed, state, (base, heads)


def test_fedala_weights_at_one_give_the_global_model_and_at_zero_keep_the_local_layers(
    ala_after_one_round,
):
    fed, state, local = ala_after_one_round
    received = (state.base, state.global_heads)
    assert not torch.equal(local[1]["label"], received[1]["label"])
    frozen = FedALA(eta=0.0)  # W stays where it starts: the ALA step with W fixed
    _, ctx, data = _client(fed, 1)
    ones = torch.ones_like(received[1]["label"])
    (base, heads), w = frozen.adapt(ctx, local, received, data, ones)
    assert torch.equal(w, ones)
    assert torch.equal(base, received[0]) and torch.equal(heads["label"], received[1]["label"])
    (base, heads), _ = frozen.adapt(ctx, local, received, data, torch.zeros_like(ones))
    assert torch.equal(heads["label"], local[1]["label"])  # the adapted layers: local
    assert torch.equal(base, received[0])  # the layers below: global
    # with the base's last linear layer adapted too, W = 0 keeps it local, the rest global
    deeper = FedALA(eta=0.0, base_tensors=2)
    tail = sum(p.numel() for p in list(ctx.model.base.parameters())[-2:])
    zeros = torch.zeros(tail + ones.numel())
    (base, heads), _ = deeper.adapt(ctx, local, received, data, zeros)
    assert torch.equal(base[-tail:], local[0][-tail:])
    assert torch.equal(base[:-tail], received[0][:-tail])
    assert torch.equal(heads["label"], local[1]["label"])


def test_fedala_learned_weights_lower_the_loss_on_the_sampled_rows(ala_after_one_round):
    fed, state, local = ala_after_one_round
    received = (state.base, state.global_heads)
    alg = FedALA()
    client, ctx, data = _client(fed, 1)
    rows = alg.window(data.n_train, fed.context(client, 1).generator)  # the rows adapt draws
    assert rows.stop - rows.start == int(0.8 * data.n_train)
    (base, heads), w = alg.adapt(ctx, local, received, data, None)
    assert ((w >= 0) & (w <= 1)).all() and (w < 1).any()
    x, y = data.x_train[rows], {k: v[rows] for k, v in data.y_train.items()}
    learned = _loss(ctx.model, base, heads, x, y, ctx.tasks)
    at_one = _loss(
        ctx.model, *alg.mix(ctx.model, local, received, torch.ones_like(w)), x, y, ctx.tasks
    )
    assert learned < at_one - 0.01, (learned, at_one)
    # the round: ALA, local training, the whole model's change against the received one
    kept = PersonalState(local[1], local[0])
    update, personal = alg.client_round(ctx, state, data, "all", kept)
    assert torch.allclose(personal.base, state.base + update.delta_base, atol=1e-6)
    assert torch.allclose(
        personal.heads["label"],
        state.global_heads["label"] + update.delta_heads["label"],
        atol=1e-6,
    )
    assert personal.extra[WEIGHTS].shape == w.shape  # W is kept for the next round


# FedDBE -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dbe_rounds(digits):
    """A FedDBE federation: round 0's state, round 1's updates and the state after it."""
    make, manifest = digits
    fed = make(FedDBE(), "dbe")
    clients = manifest.client_ids
    state0 = fed.initial_state()
    updates, _ = fed.screen(fed.train_clients(clients, state0))
    groups, _ = fed.aggregate(updates, state0, clients)
    return fed, state0, updates, fed.merge(state0, groups, updates)


def test_feddbe_global_mean_is_the_sample_weighted_mean_of_round_one(dbe_rounds):
    fed, state0, updates, state1 = dbe_rounds
    assert torch.equal(state0.global_heads[MEAN], torch.zeros_like(state0.global_heads[MEAN]))
    assert MEAN not in dataclasses.replace(fed, algorithm=FedALA()).initial_state().global_heads
    n = torch.tensor([float(u.n_samples) for u in updates])
    means = torch.stack([u.delta_heads[MEAN] for u in updates])  # z̄_c − 0
    assert (means.norm(dim=1) > 0).all()
    assert torch.allclose(
        state1.global_heads[MEAN], (n[:, None] * means).sum(0) / n.sum(), atol=1e-6
    )
    # from round 2 the clients release no change of it: it stays fixed
    update = fed.client_round(fed.manifest.client_ids[0], state1)
    assert torch.count_nonzero(update.delta_heads[MEAN]) == 0


def test_feddbe_prbm_is_kept_never_released_and_shifts_the_representation(dbe_rounds):
    fed, _, _, state1 = dbe_rounds
    client, ctx, data = _client(fed, 1)
    update, personal = fed.algorithm.client_round(ctx, state1, data, "all", None)
    bias = personal.extra[PRBM]
    assert bias.norm() > 0  # learnt in round 2
    assert set(update.delta_heads) == {"label", MEAN}  # the tasks and z̄, no PRBM entry
    released = [update.delta_base, *update.delta_heads.values()]
    assert not any(v.shape == bias.shape and torch.allclose(v, bias) for v in released)
    # the personalised model is θ + b + φ: b folded exactly into the heads' biases
    base, heads, _ = fed.algorithm.personalized(ctx, state1, data, "all", personal)
    assert torch.equal(base, state1.base) and set(heads) == {"label"}
    assert not torch.equal(heads["label"], state1.global_heads["label"])
    load_weights(ctx.model, state1.base, {"label": state1.global_heads["label"]})
    with torch.no_grad():
        z = ctx.model.base(data.x_test)
        shifted = ctx.model.heads["label"](z + bias)
        load_weights(ctx.model, base, heads)
        assert torch.allclose(ctx.model.heads["label"](z), shifted, atol=1e-5)
    # without a PRBM (a client that never trained) it is the global model
    base, heads, _ = fed.algorithm.personalized(ctx, state1, data, "all", None)
    assert torch.equal(heads["label"], state1.global_heads["label"])


def test_feddbe_mean_regularisation_pulls_the_representation_mean_to_the_global_mean(
    dbe_rounds,
):
    fed, _, _, state1 = dbe_rounds
    target = state1.global_heads[MEAN]
    gaps = {}
    for kappa in (0.0, 50.0):
        _, ctx, data = _client(fed, 1)  # the same data and seed
        update, _ = FedDBE(kappa=kappa).client_round(ctx, state1, data, "all", None)
        load_weights(ctx.model, state1.base + update.delta_base, {})
        with torch.no_grad():
            gaps[kappa] = float((ctx.model.base(data.x_train).mean(0) - target).norm())
    assert gaps[50.0] < 0.9 * gaps[0.0], gaps


# both: a few rounds, and their personal state in the store --------------------------------


@pytest.mark.parametrize("algorithm", [FedALA(), FedDBE()], ids=["fedala", "feddbe"])
def test_a_few_rounds_learn_with_one_task_and_with_two(digits, two_tasks, algorithm):
    make, manifest = digits
    state, _, history = run_rounds(make(algorithm, f"run-{algorithm.name}"), manifest.client_ids, 3)
    assert history[-1]["personal/accuracy/mean"] > 0.2
    make, manifest = two_tasks
    fed = make(algorithm, f"run2-{algorithm.name}")
    state, records, history = run_rounds(fed, manifest.client_ids, 3)
    assert set(records["task"]) == {"label", "score"}
    personal = {
        k: v for k, v in history[-1].items() if k.startswith(("personal/", "score/personal/"))
    }
    assert personal and all(math.isfinite(v) for v in personal.values())
    assert history[-1]["personal/accuracy/mean"] > 0.4
    kept = fed.store.load(manifest.client_ids[0])
    assert (WEIGHTS if algorithm.name == "fedala" else PRBM) in kept.extra


def test_personal_state_extra_round_trips_through_the_store(tmp_path):
    store = ClientStore(tmp_path)
    kept = PersonalState({"label": torch.ones(3)}, None, {PRBM: torch.arange(4.0)})
    store.save("c1", kept, 2)
    loaded = store.load("c1")
    assert torch.equal(loaded.extra[PRBM], torch.arange(4.0)) and loaded.base is None
    store.save("c2", PersonalState({"label": torch.ones(3)}), 1)
    assert store.load("c2").extra == {}
    # a state written before ``extra`` existed still loads
    assert PersonalState.from_dict({"heads": {}, "base": None}).extra == {}


def test_feddbe_needs_plain_averaging_at_the_server():
    from fedmtl.config import load_config

    for setting in ("server.optimizer=fedadam", "server.lr=0.5"):
        with pytest.raises(ValueError, match="server.optimizer=fedavg and server.lr=1"):
            load_config(None, ["algorithm.method=feddbe", setting])
    load_config(None, ["algorithm.method=feddbe"])
