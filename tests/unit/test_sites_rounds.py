"""Local training at sites on the one round loop (fedmtl/sites/rounds.py), in process: the model
equals the simulation's for the same partitions and seeds; a late, tampered, replayed or
impersonated update is dropped or refused, naming the site, and the round completes."""

from __future__ import annotations

import threading

import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run, run_round, run_rounds
from fedmtl.sites.envelope import seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.rounds import InProcessLauncher, SiteSession, SiteSteps
from fedmtl.state import FailureKind
from tests.conftest import tiny_overrides

SETTINGS = {"data.partition.n_clients": 6, "training.batched": "off", "training.local_epochs": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    cfg = load_config(None, tiny_overrides(root, **SETTINGS))
    prepare(cfg.data)
    partition(cfg.data)
    return root, cfg, read_manifest(cfg.data.partitions_dir)


def federation(data, store: str) -> Federation:
    root, cfg, manifest = data
    return Federation.from_config(cfg, manifest, ClientStore(root / store))


def sites(data, tmp_path, run_id: str = "run1"):
    """The coordinator's steps and every site's session, keys exchanged, one exchange store."""
    _, _, manifest = data
    coordinator = Identity.generate(COORDINATOR)
    at_coordinator, at_sites = KnownParties(), KnownParties()
    at_sites.add(COORDINATOR, coordinator.public)
    exchange = Exchange(f"file://{tmp_path}/exchange", run_id)
    sessions = {}
    for client in manifest.client_ids:
        me = Identity.generate(client)
        at_coordinator.add(client, me.public)
        sessions[client] = SiteSession(
            me, at_sites, exchange, federation(data, f"{tmp_path.name}-{client}"), client
        )
    return exchange, coordinator, at_coordinator, sessions


def test_training_and_evaluation_at_sites_give_the_simulated_model_and_figures(data, tmp_path):
    _, _, manifest = data
    clients = manifest.client_ids
    simulated, sim_records, _ = run_rounds(federation(data, "sim"), clients, 3, evaluate_every=3)
    exchange, coordinator, known, sessions = sites(data, tmp_path)
    launcher = InProcessLauncher(sessions)
    steps = SiteSteps(exchange, coordinator, known, launcher, deadline=120)
    coord = federation(data, "coordinator")
    outcome = run(coord, coord.initial_state(), clients, 3, steps=steps, evaluate_every=3)
    launcher.close()
    key = ["client", "variant", "task"]
    at_sites = outcome.records.sort_values(key).reset_index(drop=True)
    simulated_records = sim_records.sort_values(key).reset_index(drop=True)
    assert len(at_sites) == len(simulated_records) == 3 * len(clients)
    for column in ("accuracy", "f1", "n_test"):
        assert at_sites[column].tolist() == pytest.approx(
            simulated_records[column].tolist(), abs=1e-6
        )
    assert outcome.state.round == simulated.round == 3
    assert torch.allclose(outcome.state.base, simulated.base, atol=1e-6)
    for group, heads in simulated.group_heads.items():
        for task, head in heads.items():
            assert torch.allclose(outcome.state.group_heads[group][task], head, atol=1e-6)
    sent, back = steps.traffic[clients[0]]
    assert (
        sent > 4 * simulated.base.numel() and back > 4 * simulated.base.numel()
    )  # bytes a site a round
    # nothing of a client's own state is kept at the coordinator
    assert not coord.store.root.exists() or not any(coord.store.root.iterdir())


class Misbehaving(InProcessLauncher):
    """Sites that train honestly, then one of several things happens to their update."""

    def __init__(self, sessions, exchange, mischief, victim):
        super().__init__(sessions, workers=len(sessions))
        self.exchange, self.mischief, self.victim = exchange, mischief, victim

    def launch(self, site, round_, task="train"):
        def job():
            if self.mischief.get(site) == "late":
                threading.Event().wait(5)
                return
            self.sessions[site].train(round_)
            what = self.mischief.get(site)
            path = self.exchange.update(round_, site)
            if what == "tamper":
                blob = bytearray(self.exchange.get(path))
                blob[len(blob) // 2] ^= 0x10
                self.exchange.put(path, bytes(blob))
            elif what == "replay":  # last round's genuine update in this round's place
                self.exchange.put(path, self.exchange.get(self.exchange.update(round_ - 1, site)))
            elif what == "impersonate":  # then writes its own sealed update in the victim's place
                victim = self.exchange.update(round_, self.victim)
                for _ in range(200):
                    if self.exchange.get(victim) is not None:
                        break
                    threading.Event().wait(0.01)
                self.exchange.put(victim, self.exchange.get(path))

        return self._pool.submit(job)


def test_late_tampered_replayed_and_impersonated_updates_are_dropped_naming_the_site(
    data, tmp_path
):
    _, _, manifest = data
    clients = manifest.client_ids  # c000 .. c005
    exchange, coordinator, known, sessions = sites(data, tmp_path, "run2")
    coord = federation(data, "coordinator2")
    honest = InProcessLauncher(sessions)
    state, _ = run_round(
        coord,
        coord.initial_state(),
        clients,
        SiteSteps(exchange, coordinator, known, honest),
        evaluate=False,
    )
    honest.close()
    mischief = {
        clients[1]: "tamper",
        clients[2]: "replay",
        clients[3]: "late",
        clients[5]: "impersonate",
    }
    bad = Misbehaving(sessions, exchange, mischief, victim=clients[4])
    steps = SiteSteps(exchange, coordinator, known, bad, deadline=2.0)
    after, report = run_round(coord, state, clients, steps, min_clients=1, evaluate=False)
    bad.close()
    failed = report.failed
    assert after.round == 2 and set(failed) == {clients[1], clients[2], clients[3], clients[4]}
    assert failed[clients[1]].kind is FailureKind.REJECTED and "signature does not verify" in str(
        failed[clients[1]]
    )
    assert failed[clients[2]].kind is FailureKind.REJECTED and "a replay" in str(failed[clients[2]])
    assert failed[clients[3]].kind is FailureKind.TIMEOUT and "deadline" in str(failed[clients[3]])
    assert failed[clients[4]].kind is FailureKind.REJECTED
    assert f"says it comes from '{clients[5]}'" in str(failed[clients[4]])
    assert [u.client for u in report.updates] == [clients[0], clients[5]]
    for site, failure in failed.items():
        assert str(failure).count(f"site '{site}'") >= 1


def test_a_site_refuses_a_global_state_not_signed_by_its_coordinator(data, tmp_path):
    _, _, manifest = data
    exchange, coordinator, known, sessions = sites(data, tmp_path, "run3")
    coord = federation(data, "coordinator3")
    impostor = Identity(COORDINATOR, Identity.generate("mallory").private)
    from fedmtl.sites.wire import encode_state

    exchange.put(
        exchange.global_state(1),
        seal(
            encode_state(coord.initial_state()), impostor, run="run3", round_=1, kind="global-state"
        ),
    )
    with pytest.raises(
        ValueError, match="site 'coordinator': global-state of round 1 refused: the signature"
    ):
        sessions[manifest.client_ids[0]].train(1)


def test_pooled_evaluation_at_sites_is_refused_until_the_secure_sum_spans_processes(data, tmp_path):
    root, cfg, manifest = data
    exchange, coordinator, known, sessions = sites(data, tmp_path, "run4")
    private = Federation.from_config(
        load_config(
            None, tiny_overrides(root, **SETTINGS, **{"privacy.evaluation.client_metrics": False})
        ),
        manifest,
        ClientStore(root / "coordinator4"),
    )
    steps = SiteSteps(exchange, coordinator, known, InProcessLauncher(sessions))
    with pytest.raises(NotImplementedError, match="secure sum across site processes"):
        steps.evaluate(private, private.initial_state(), manifest.client_ids)
