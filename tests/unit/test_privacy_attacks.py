"""The security review's attacks, tried with the project's own code against a small federation.

Each test first shows the attack is real (it works against the test-only seeded source, or
against the code as it was), then that it fails against what a run uses."""

from __future__ import annotations

import dataclasses
import math
import os
import stat

import numpy as np
import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.client.training import client_seed
from fedmtl.config import load_config
from fedmtl.data.manifest import read_manifest
from fedmtl.data.partitions import partition, prepare
from fedmtl.federation import Federation, participants
from fedmtl.privacy import dp
from fedmtl.privacy.randomness import KEY_FILE, SecretRandom
from tests.conftest import tiny_overrides

DP = {
    "privacy.dp_fedavg.enabled": True,
    "privacy.dp_fedavg.noise_multiplier": 1.0,
    "privacy.dp_fedavg.clip_norm": 0.5,
    "privacy.min_group_size": 2,
    "data.partition.n_clients": 8,
    "algorithm.method": "fedavg",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    return root, read_manifest(cfg.data.partitions_dir)


def federation(data, store: str, **extra) -> Federation:
    root, manifest = data
    cfg = load_config(None, tiny_overrides(root, **{**DP, **extra}))
    return Federation.from_config(cfg, manifest, ClientStore(root / store))


def logged_seeds(fed: Federation) -> list[int]:
    """Every seed an attacker reads off the MLflow run's parameters (training.seed, data.seed,
    coldstart.seed all default to 0) and a few more guesses."""
    return sorted({fed.seed, 0, 1, 42})


def released_and_true(fed: Federation, round_: int = 0):
    """One round's DP release of the single (pooled) group: the released sum Σ clip(u) + noise,
    and the true clipped sum the noise is meant to hide."""
    state = fed.initial_state()
    clients = fed.manifest.client_ids
    updates = fed.train_clients(clients, state)
    aggregates, report = fed.aggregate(updates, state, clients, 1.0)
    ((name, agg),) = aggregates.items()
    released = (
        agg.delta_base.to(torch.float64) * agg.weight
    )  # the noised sum, before the public division
    true = torch.zeros_like(released)
    for u in updates:
        clipped, _ = dp.clip_update(
            torch.cat(
                [u.delta_base.reshape(-1)]
                + [u.delta_heads[t].reshape(-1) for t in sorted(u.delta_heads)]
            ),
            report.clip,
        )
        true += clipped[: released.numel()].to(torch.float64)
    report.dim = released.numel() + sum(
        h.numel() for h in agg.delta_heads.values()
    )  # the release's length
    return released, true, report


def old_noise(seed: int, round_: int, shape, std: float) -> torch.Tensor:
    """The noise as main drew it before the fix: a torch generator seeded from training.seed."""
    return dp.gaussian_noise(
        torch.zeros(shape),
        std,
        torch.Generator().manual_seed(client_seed(seed, round_, "server", "dp-noise")),
    ).to(torch.float64)


def test_the_dp_noise_cannot_be_regenerated_from_any_logged_value(data):
    fed = federation(data, "noise")
    released, true, report = released_and_true(fed)
    noise_norm = float(torch.linalg.vector_norm(released - true))
    expected = report.noise_std * math.sqrt(
        released.numel() + len(fed.manifest.tasks)
    )  # ≈ ‖N(0, σ²I)‖
    assert noise_norm > 0.5 * report.noise_std * math.sqrt(released.numel())
    for seed in logged_seeds(fed):  # the attack: subtract the noise the seed would give
        guess = old_noise(seed, 0, (report.dim,), report.noise_std)[: released.numel()]
        left = float(torch.linalg.vector_norm(released - guess - true))
        assert left > 0.5 * noise_norm, f"seed {seed} removed the noise"
        # nor the seeded secret a test-only run would use: the key is not derived from the seed
        seeded = SecretRandom.insecure_from_seed(seed).stream("server", 0, "dp-noise")
        guess = dp.gaussian_noise(
            torch.zeros(report.dim, dtype=torch.float64), report.noise_std, seeded
        )
        guess = guess[: released.numel()]
        assert float(torch.linalg.vector_norm(released - guess - true)) > 0.5 * noise_norm
    assert expected > 0


def test_the_attack_works_on_a_seeded_run_which_is_why_that_is_test_only(data):
    """The same subtraction recovers the true sum from a privacy.insecure_seeded_noise run:
    the attack is real, and that setting voids ε (the flow tags the run so)."""
    fed = federation(data, "seeded", **{"privacy.insecure_seeded_noise": True})
    assert fed.secret.seeded
    released, true, report = released_and_true(fed)
    regenerated = SecretRandom.insecure_from_seed(fed.seed).stream("server", 0, "dp-noise")
    noise = dp.gaussian_noise(
        torch.zeros(report.dim, dtype=torch.float64), report.noise_std, regenerated
    )
    noise = noise[: released.numel()]  # the base's part of the release
    assert float(torch.linalg.vector_norm(released - noise - true)) < 1e-4 * float(
        torch.linalg.vector_norm(true)
    )


def test_torch_generators_keep_only_32_bits_of_a_seed_so_a_secret_seed_would_not_do():
    a = torch.randn(4, generator=torch.Generator().manual_seed(12345))
    b = torch.randn(4, generator=torch.Generator().manual_seed(12345 + 2**32))
    assert torch.equal(a, b)  # why the secret streams are ChaCha20, not a secretly seeded generator


def test_the_rounds_participants_cannot_be_predicted_from_the_seed(data):
    fed = federation(data, "sampling", **{"data.partition.n_clients": 8})
    clients = [f"c{i:04d}" for i in range(400)]
    rate = 0.3
    agree = []
    for r in range(5):
        chosen = set(participants(fed, clients, rate, r))
        for seed in logged_seeds(fed):  # the attack: the draws main made from (seed, round)
            draws = np.random.default_rng([seed, r, 1]).random(len(clients))
            predicted = {c for c, d in zip(clients, draws) if d < rate}
            agree.append(len(chosen & predicted) / max(len(predicted), 1))
    # a guess is right about as often as the rate itself (chance), never close to always
    assert np.mean(agree) < rate + 0.1
    seeded = federation(data, "sampling-seeded", **{"privacy.insecure_seeded_noise": True})
    replay = SecretRandom.insecure_from_seed(0)
    draws = replay.stream("round", 3, "participation").uniform(len(clients))
    assert participants(seeded, clients, rate, 3) == [c for c, d in zip(clients, draws) if d < rate]


def test_the_run_key_is_kept_with_mode_0600_and_reloads_for_a_resume(tmp_path):
    first = SecretRandom.load_or_create(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode)
    assert mode == 0o600
    again = SecretRandom.load_or_create(tmp_path)
    assert again.key == first.key and not again.seeded
    assert first.key.hex() not in repr(first) and "secret" in repr(first)
    assert SecretRandom.load_or_create(tmp_path / "other").key != first.key


def test_the_same_key_draws_the_same_noise_so_a_resume_is_bit_identical(data):
    key = SecretRandom.fresh()
    a = dataclasses.replace(federation(data, "resume-a"), secret=key)
    b = dataclasses.replace(federation(data, "resume-b"), secret=SecretRandom(key.key))
    ra, _, _ = released_and_true(a)
    rb, _, _ = released_and_true(b)
    assert torch.equal(ra, rb)


# --- bounded influence -------------------------------------------------------------------

HONEST = {"privacy.dp_fedavg.enabled": False, "algorithm.method": "fedavg"}


def test_an_update_scaled_by_1e30_is_refused_naming_the_client_and_the_federation_goes_on(data):
    fed = federation(data, "huge", **HONEST)
    clients = fed.manifest.client_ids
    state = fed.initial_state()
    updates = fed.train_clients(clients, state)
    honest = [u for u in updates if u.client != clients[0]]
    attacker = updates[0]
    attacker.delta_base = attacker.delta_base * 1e30
    kept, refused = fed.screen(updates)
    assert list(refused) == [clients[0]] and f"client '{clients[0]}'" in str(refused[clients[0]])
    assert "server.max_norm_ratio" in str(refused[clients[0]]) and not refused[clients[0]].retryable
    groups, _ = fed.aggregate(kept, state, clients)
    after = fed.merge(state, groups)
    assert float(after.base.abs().max()) < 10.0
    clean, _ = fed.aggregate(fed.screen(honest)[0], state, clients)
    assert torch.allclose(after.base, fed.merge(state, clean).base)
    # the next round's honest updates are accepted (main refused them all as NaN)
    nxt, refused = fed.screen(fed.train_clients(clients, after))
    assert len(nxt) == len(clients) and not refused


def test_a_client_claiming_1e12_samples_gets_its_manifest_weight(data):
    fed = federation(data, "claims", **HONEST)
    clients = fed.manifest.client_ids
    state = fed.initial_state()
    updates = fed.train_clients(clients, state)
    reference = [u.n_samples for u in updates]
    updates[0].n_samples = 10**12
    kept, refused = fed.screen(updates)
    assert not refused
    assert [u.n_samples for u in kept] == [fed.manifest_rows(c) for c in clients] == reference
    groups, _ = fed.aggregate(kept, state, clients)
    assert sum(g.n_samples for g in groups.values()) == sum(reference)


def test_without_the_bound_the_1e30_update_takes_over_which_is_the_attack(data):
    fed = federation(data, "unbounded", **HONEST, **{"server.max_norm_ratio": "null"})
    clients = fed.manifest.client_ids
    state = fed.initial_state()
    updates = fed.train_clients(clients, state)
    updates[0].delta_base = updates[0].delta_base * 1e30
    kept, refused = fed.screen(updates)
    assert not refused
    groups, _ = fed.aggregate(kept, state, clients)
    assert float(fed.merge(state, groups).base.abs().max()) > 1e20


def test_bounded_influence_refuses_nothing_honest_over_a_run(data):
    from fedmtl.rounds import run_rounds

    fed = federation(data, "honest", **HONEST)
    _, _, history = run_rounds(fed, fed.manifest.client_ids, 3)
    assert [h["clients/refused"] for h in history] == [0.0, 0.0, 0.0]
