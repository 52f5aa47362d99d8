"""SecAgg+ across sites (fedmtl/sites/secure.py), the sites on threads of this process but
talking only through the exchange store: the model equals the simulation's with the secure sum;
no stored vector equals or correlates with a site's plain update; a site that crashes before
masking or whose masked input is tampered is dropped, named, and the others' sum stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.privacy.release_vector import release_input
from fedmtl.privacy.secagg import wire as secagg_wire
from fedmtl.rounds import InProcess, run_round
from fedmtl.sites.envelope import open_envelope
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.rounds import InProcessLauncher, SiteSession, SiteSteps
from tests.conftest import tiny_overrides

SETTINGS = {
    "data.partition.n_clients": 8,  # 4 a group: SecAgg+ (k=3, t=2) recovers from 1 dropout
    "data.partition.n_groups": 2,
    "training.batched": "off",
    "training.local_epochs": 1,
    "privacy.secure_sum.enabled": True,
    "privacy.evaluation.client_metrics": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-sites")
    cfg = load_config(None, tiny_overrides(root, **SETTINGS))
    prepare(cfg.data)
    partition(cfg.data)
    return root, cfg, read_manifest(cfg.data.partitions_dir)


def federation(data, store: str) -> Federation:
    root, cfg, manifest = data
    return Federation.from_config(cfg, manifest, ClientStore(root / store))


class FaultyExchange(Exchange):
    """A site's view of the store in which its SecAgg+ ``masked`` message is lost (the site
    crashes there) or has a bit flipped on its way."""

    def __init__(self, url: str, run: str, fault: str) -> None:
        super().__init__(url, run)
        self.fault = fault

    def put(self, relpath: str, blob: bytes) -> int:
        if "/secagg/masked/" in relpath:
            if self.fault == "crash":
                raise RuntimeError("the site crashed before sending its masked input")
            blob = bytearray(blob)
            blob[-7] ^= 0x01
            blob = bytes(blob)
        return super().put(relpath, blob)


def sites(data, tmp_path, run_id: str, faults: dict[str, str] | None = None):
    _, _, manifest = data
    coordinator = Identity.generate(COORDINATOR)
    at_coordinator, at_sites = KnownParties(), KnownParties()
    at_sites.add(COORDINATOR, coordinator.public)
    url = f"file://{tmp_path}/exchange"
    sessions = {}
    for client in manifest.client_ids:
        me = Identity.generate(client)
        at_coordinator.add(client, me.public)
        fault = (faults or {}).get(client)
        exchange = FaultyExchange(url, run_id, fault) if fault else Exchange(url, run_id)
        sessions[client] = SiteSession(
            me, at_sites, exchange, federation(data, f"{tmp_path.name}-{client}"), client, 30.0
        )
    return Exchange(url, run_id), coordinator, at_coordinator, sessions


class Watched(SiteSteps):
    """Keeps the round's group aggregates, to compare them with the plain sums."""

    def group_aggregate(self, *args, **kwargs):
        groups, privacy = super().group_aggregate(*args, **kwargs)
        self.seen = groups
        return groups, privacy


def plain_inputs(data, state, clients):
    """Each client's plain release vector of the round from ``state`` (what its site masks)."""
    fed = federation(data, "plain")
    spec = fed.privacy
    scale = float(max(fed.manifest_rows(c) for c in fed.manifest.client_ids))
    out = {}
    for client in clients:
        update = fed.client_round(client, state)
        update.n_samples = fed.manifest_rows(client)
        tasks = sorted(update.delta_heads)
        out[client] = release_input(update, spec, fed.release.clip_norm(state), scale, tasks)
    return out


def test_the_secure_sum_across_sites_gives_the_simulated_model_and_hides_every_update(
    data, tmp_path
):
    _, _, manifest = data
    clients = manifest.client_ids
    sim = federation(data, "sim")
    simulated, _ = run_round(sim, sim.initial_state(), clients, InProcess(), evaluate=False)
    exchange, coordinator, known, sessions = sites(data, tmp_path, "secure1")
    launcher = InProcessLauncher(sessions, workers=len(clients))
    steps = SiteSteps(exchange, coordinator, known, launcher, deadline=60, stage_deadline=30)
    coord = federation(data, "coordinator")
    start = coord.initial_state()
    state, report = run_round(coord, start, clients, steps, evaluate=False)
    launcher.close()
    assert report.privacy is not None and not report.privacy.dropped_mid_protocol
    assert sorted(report.privacy.releases) == sorted(
        {coord.release_group(c, start) for c in clients}
    )
    # the sum is exact: the same model as the simulation's secure sum, to float precision
    assert torch.allclose(state.base, simulated.base, atol=1e-6)
    for group, heads in simulated.group_heads.items():
        for task, head in heads.items():
            assert torch.allclose(state.group_heads[group][task], head, atol=1e-6)
    # every vector the coordinator (or the store) can read is masked
    plain = plain_inputs(data, start, clients)
    stored = exchange.listing()
    for client in clients:
        vector, _ = plain[client]
        blob = exchange.get(exchange.secagg(1, "masked", client))
        assert blob is not None, f"no masked input from {client}: {stored}"
        payload = open_envelope(
            blob, known, sender=client, run="secure1", round_=1, kind="secagg-masked"
        )
        words = secagg_wire.decode_masked(client, payload, vector.numel() + 1).words
        masked = words[: vector.numel()].astype(np.float64)
        assert abs(np.corrcoef(masked, vector.numpy().astype(np.float64))[0, 1]) < 0.1
        window = vector.numpy()[:32].astype("<f4").tobytes()
        for path in stored:
            raw = exchange.get(path)
            assert window not in raw, f"{client}'s plain update is readable in {path}"
    assert not any("/sites/" in path for path in stored), "no plain update was sent"


@pytest.mark.parametrize("fault", ["crash", "tamper"])
def test_a_site_lost_or_tampered_mid_protocol_is_dropped_naming_it_and_the_sum_stays_exact(
    data, tmp_path, fault
):
    _, _, manifest = data
    clients = manifest.client_ids
    coord = federation(data, f"coordinator-{fault}")
    start = coord.initial_state()
    groups = {c: coord.release_group(c, start) for c in clients}
    victim = clients[0]
    exchange, coordinator, known, sessions = sites(data, tmp_path, f"s{fault}", {victim: fault})
    launcher = InProcessLauncher(sessions, workers=len(clients))
    steps = Watched(exchange, coordinator, known, launcher, deadline=60, stage_deadline=10)
    state, report = run_round(coord, start, clients, steps, evaluate=False)
    launcher.close()
    privacy = report.privacy
    assert privacy.dropped_mid_protocol == [victim]
    assert f"site '{victim}'" in privacy.dropped_reasons[victim]
    if fault == "tamper":
        assert "signature does not verify" in privacy.dropped_reasons[victim]
    # the victim's group: the weighted mean of the others' plain inputs, exactly (fixed point)
    plain = plain_inputs(data, start, clients)
    group = groups[victim]
    others = [c for c in clients if groups[c] == group and c != victim]
    total = sum(plain[c][0].to(torch.float64) for c in others)
    mean = total / sum(plain[c][1] for c in others)
    aggregate = steps.seen[group]
    assert aggregate.clients == others and state.round == 1
    base = start.base.numel()
    assert torch.allclose(aggregate.delta_base.to(torch.float64), mean[:base], atol=1e-5)
    heads = torch.cat([aggregate.delta_heads[t] for t in sorted(aggregate.delta_heads)])
    assert torch.allclose(heads.to(torch.float64), mean[base:], atol=1e-5)
    # the other group lost no one
    other = next(g for g in steps.seen if g != group)
    assert len(steps.seen[other].clients) == len([c for c in clients if groups[c] == other])


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"privacy.secure_sum.dropout": 0.2}, "privacy.secure_sum.dropout=0.2"),
        ({"server.aggregator": "median"}, "server.aggregator=median"),
        ({"grouping.method": "cluster"}, "groups learned from the updates"),
    ],
)
def test_settings_the_secure_sum_at_sites_cannot_honour_are_refused_naming_them(
    tmp_path, setting, named
):
    sites_mode = {
        "federation.mode": "sites",
        "federation.exchange": f"file://{tmp_path}/exchange",
        "federation.sites": str(tmp_path / "keys"),
    }
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(None, tiny_overrides(tmp_path, **SETTINGS, **sites_mode, **setting))
    load_config(None, tiny_overrides(tmp_path, **SETTINGS, **sites_mode))  # the rest is fine


def test_sites_lacking_some_tasks_sum_each_head_over_the_sites_that_hold_it(tmp_path):
    """Optional tasks across sites: each site puts its per-task rows into the masked vector (the
    session says so), and the model equals the simulation's secure sum."""
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            **{
                **SETTINGS,
                "data.source": "synthetic",
                "data.synthetic.n_clients": 8,
                "data.synthetic.n_tasks": 2,
                "data.partition.missing_tasks": 0.5,
                "model.hidden": "[8]",
            },
        ),
    )
    prepare(cfg.data)
    partition(cfg.data)
    made = (tmp_path, cfg, read_manifest(cfg.data.partitions_dir))
    clients = made[2].client_ids
    assert made[2].tasks[1].optional
    sim = federation(made, "sim")
    assert sim.release.partial
    simulated, _ = run_round(sim, sim.initial_state(), clients, InProcess(), evaluate=False)
    exchange, coordinator, known, sessions = sites(made, tmp_path, "secure-partial")
    launcher = InProcessLauncher(sessions, workers=len(clients))
    steps = SiteSteps(exchange, coordinator, known, launcher, deadline=60, stage_deadline=30)
    coord = federation(made, "coordinator")
    state, report = run_round(coord, coord.initial_state(), clients, steps, evaluate=False)
    launcher.close()
    assert report.privacy is not None and not report.privacy.dropped_mid_protocol
    assert torch.allclose(state.base, simulated.base, atol=1e-6)
    for group, heads in simulated.group_heads.items():
        for task, head in heads.items():
            assert torch.allclose(state.group_heads[group][task], head, atol=1e-6), task
