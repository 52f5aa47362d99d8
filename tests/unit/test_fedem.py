"""FedEM's defining properties: one EM step per client round (responsibilities, π_c their mean,
responsibility-weighted training of every component), FedAvg when there is one component, and
clients whose data follow different rules settling on different components."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmtl.algorithms import get_algorithm
from fedmtl.algorithms.base import ClientContext
from fedmtl.algorithms.fedem import FedEM, component_losses, responsibilities
from fedmtl.client.data import ClientData
from fedmtl.client.store import ClientStore
from fedmtl.client.training import LocalConfig, load_weights
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import TaskSpec, read_manifest
from fedmtl.federation import Federation
from fedmtl.nn import MLPBase, MultiTaskModel
from fedmtl.rounds import run_rounds
from fedmtl.server.aggregation import global_merge, group_aggregate
from fedmtl.state import initial_state
from tests.conftest import tiny_overrides, with_settings


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Federations on the tiny digits data (8 clients), with a given method object."""
    root = tmp_path_factory.mktemp("fedem")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    plain = with_settings(cfg, {"algorithm.method": "fedavg"})

    def federation(algorithm, store: str) -> Federation:
        fed = Federation.from_config(plain, manifest, ClientStore(root / store))
        return dataclasses.replace(fed, algorithm=algorithm)

    return federation


def test_one_component_is_fedavg(make):
    fedavg = make(get_algorithm("fedavg"), "avg")
    fedem = make(FedEM(n_components=1), "em1")
    client = fedavg.manifest.client_ids[0]
    data = fedavg.data(client)
    a, e = fedavg.initial_state(), fedem.initial_state()
    # the same initial weights, plus the mixture slot π = 1 first in each head
    assert torch.equal(a.base, e.base)
    assert torch.equal(e.global_heads["label"][1:], a.global_heads["label"])
    assert float(e.global_heads["label"][0]) == 1.0

    avg, _ = fedavg.algorithm.client_round(fedavg.context(client, 0), a, data, "all", None)
    em, personal = fedem.algorithm.client_round(fedem.context(client, 0), e, data, "all", None)
    assert torch.allclose(em.delta_base, avg.delta_base, atol=1e-6)
    assert torch.allclose(em.delta_heads["label"][1:], avg.delta_heads["label"], atol=1e-6)
    assert float(em.delta_heads["label"][0]) == 0.0
    assert float(fedem.algorithm.mixture_weights(personal)) == 1.0

    # and whole rounds through the federation (FedAvg's clients train batched)
    sa, _, ha = run_rounds(fedavg, fedavg.manifest.client_ids, 2)
    se, _, he = run_rounds(fedem, fedem.manifest.client_ids, 2)
    assert torch.allclose(se.base, sa.base, atol=1e-5)
    assert torch.allclose(se.global_heads["label"][1:], sa.global_heads["label"], atol=1e-5)
    for variant in ("global", "personal"):
        key = f"{variant}/accuracy/mean"
        assert he[-1][key] == pytest.approx(ha[-1][key], abs=5e-3), key


def test_responsibilities_sum_to_one_and_pi_is_their_mean(make):
    fed = make(FedEM(), "em-steps")
    algo: FedEM = fed.algorithm
    client = fed.manifest.client_ids[0]
    data, state = fed.data(client), fed.initial_state()
    ctx = fed.context(client, 0)
    model, tasks = ctx.model, ctx.tasks

    load_weights(model, state.base, state.global_heads)
    uniform = torch.full((3,), 1 / 3)
    q = responsibilities(model, uniform, data, tasks)
    assert q.shape == (3, data.n_train) and (q >= 0).all()
    assert torch.allclose(q.sum(0), torch.ones(data.n_train), atol=1e-6)
    model.eval()
    with torch.no_grad():  # q_m(i) ∝ π_m·exp(−ℓ_m(i)), by hand
        joint = uniform[:, None] * torch.exp(
            -component_losses(model, data.x_train, data.y_train, tasks)
        )
    assert torch.allclose(q, joint / joint.sum(0), atol=1e-6)

    update, personal = algo.client_round(ctx, state, data, "all", None)
    pi = algo.mixture_weights(personal)
    assert torch.allclose(pi, q.mean(1), atol=1e-6)
    assert math.isclose(float(pi.sum()), 1.0, abs_tol=1e-6)
    # π_c is never released: the released heads' mixture slot moves by exactly 0
    assert torch.count_nonzero(update.delta_heads["label"][:3]) == 0
    assert torch.count_nonzero(update.delta_base) > 0  # every component base is trained

    # the next round's E-step starts from the client's own π_c
    state = dataclasses.replace(
        state,
        round=1,
        base=state.base + update.delta_base,
        global_heads={t: v + update.delta_heads[t] for t, v in state.global_heads.items()},
    )
    load_weights(model, state.base, state.global_heads)
    q_next = responsibilities(model, pi, data, tasks)
    _, personal = algo.client_round(fed.context(client, 1), state, data, "all", personal)
    assert torch.allclose(algo.mixture_weights(personal), q_next.mean(1), atol=1e-6)

    # the personalised prediction is the π_c-weighted mixture of the components' probabilities;
    # the global variant the uniform mixture
    pi = algo.mixture_weights(personal)
    base, heads, _ = algo.personalized(ctx, state, data, "all", personal)
    model.eval()
    with torch.no_grad():
        load_weights(model, state.base, state.global_heads)
        outs = model.heads["label"].component_outputs(model.base(data.x_test))
        probs = torch.stack([torch.softmax(o, dim=1) for o in outs])  # [M, rows, classes]
        uniform_mix = model(data.x_test)["label"].exp()
        load_weights(model, base, heads)
        mixed = model(data.x_test)["label"].exp()
    assert torch.allclose(mixed, (pi[:, None, None] * probs).sum(0), atol=1e-5)
    assert torch.allclose(uniform_mix, probs.mean(0), atol=1e-5)


def _two_rule_clients(n_clients: int = 8) -> list[ClientData]:
    """Clients with the same inputs' distribution and labels by one of two opposite rules:
    even clients y = [x·w > 0], odd clients the flipped label."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, generator=gen)
    clients = []
    for i in range(n_clients):
        x = torch.randn(120, 6, generator=gen)
        y = (x @ w > 0).long()
        if i % 2:
            y = 1 - y
        clients.append(
            ClientData(f"c{i}", str(i % 2), x[:80], {"label": y[:80]}, x[80:], {"label": y[80:]})
        )
    return clients


def test_clients_of_two_rules_concentrate_on_different_components():
    algo = FedEM()  # M = 3
    tasks = [TaskSpec("label", "classification", [0, 1])]
    clients = _two_rule_clients()

    def model() -> torch.nn.Module:
        base = MLPBase(6, [8])
        return algo.build_model(MultiTaskModel(base, {"label": torch.nn.Linear(8, 2)}), tasks)

    torch.manual_seed(0)
    state = initial_state(model(), [])
    cfg = LocalConfig(epochs=3, lr=0.5)
    personal: dict = {}
    for r in range(10):  # the server's steps: per-group mean (one group), then the merge
        updates = []
        for i, data in enumerate(clients):
            ctx = ClientContext(model(), tasks, cfg, torch.Generator().manual_seed(100 * r + i), r)
            update, personal[data.client] = algo.client_round(
                ctx, state, data, "all", personal.get(data.client)
            )
            updates.append(update)
        state = global_merge(state, group_aggregate(updates), head_scope="global")

    pis = {c.client: algo.mixture_weights(personal[c.client]) for c in clients}
    favourite = {c.client: int(pis[c.client].argmax()) for c in clients}
    even = {favourite[c.client] for c in clients[::2]}
    odd = {favourite[c.client] for c in clients[1::2]}
    assert len(even) == 1 and len(odd) == 1 and even != odd, favourite
    (m_even,), (m_odd,) = even, odd
    for c in clients:
        own, other = (m_even, m_odd) if c.group == "0" else (m_odd, m_even)
        assert pis[c.client][own] > 0.6 and pis[c.client][other] < 0.1, (c.client, pis[c.client])
    # the server's mixture weights never moved: every client's π stayed on the client
    assert torch.allclose(state.global_heads["label"][:3], torch.full((3,), 1 / 3))


def test_rounds_through_the_federation_score_finite_and_keep_pi_local(make):
    fed = make(FedEM(), "em-run")
    state, records, history = run_rounds(fed, fed.manifest.client_ids, 2)
    for variant in ("global", "group", "personal"):
        acc = history[-1][f"{variant}/accuracy/mean"]
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0, variant
    assert torch.allclose(state.global_heads["label"][:3], torch.full((3,), 1 / 3))
    for client in fed.manifest.client_ids:
        pi = fed.algorithm.mixture_weights(fed.store.load(client))
        assert math.isclose(float(pi.sum()), 1.0, abs_tol=1e-5) and (pi >= 0).all()
