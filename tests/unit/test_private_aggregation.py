"""Private aggregation (fedmtl/privacy/aggregation.py): releases, clipping, SecAgg+, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmtl.config import PrivacyConfig
from fedmtl.privacy import secagg
from fedmtl.privacy.aggregation import POOLED, plan_releases, private_aggregate
from fedmtl.privacy.release import poisson_sample
from fedmtl.server.aggregation import global_merge, group_aggregate
from fedmtl.state import ClientUpdate, ServerState


def updates(
    groups: dict[str, int], dim_base: int = 30, dim_head: int = 6, seed: int = 0
) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for group, n in groups.items():
        for i in range(n):
            out.append(
                ClientUpdate(
                    client=f"{group}-c{i:02d}",
                    group=group,
                    n_samples=10 + 7 * i,
                    delta_base=torch.randn(dim_base, generator=g) * 0.05,
                    delta_heads={"label": torch.randn(dim_head, generator=g) * 0.05},
                )
            )
    return out


def run(ups, spec, clip=1.0, expected=None, scale=100.0):
    return private_aggregate(
        ups, spec, clip, expected or {}, scale, torch.Generator().manual_seed(1), seed=3
    )


def test_secure_aggregation_equals_the_plain_sample_weighted_means():
    ups = updates({"a": 5, "b": 4})
    plain = group_aggregate(ups)
    secure, report = run(ups, PrivacyConfig(secure_sum={"enabled": True}))
    assert sorted(secure) == ["a", "b"] and report.secagg_seconds > 0
    for g in plain:
        assert torch.allclose(secure[g].delta_base, plain[g].delta_base, atol=1e-6)
        assert torch.allclose(
            secure[g].delta_heads["label"], plain[g].delta_heads["label"], atol=1e-6
        )
        assert secure[g].n_samples == plain[g].n_samples


def test_secure_sum_survives_dropout_between_masking_and_unmasking():
    ups = updates({"a": 10})
    plain = group_aggregate(ups)["a"]
    secure, report = run(
        ups, PrivacyConfig(secure_sum={"enabled": True, "dropout": 0.3, "neighbours": 9})
    )
    assert len(report.dropped_mid_protocol) == 3
    assert torch.allclose(secure["a"].delta_base, plain.delta_base, atol=1e-6)


def test_the_aggregator_only_ever_receives_masked_inputs(monkeypatch):
    seen: list[object] = []
    original = secagg.SecAggServer.receive_masked

    def spy(self, message, *args, **kwargs):
        seen.append(message)
        return original(self, message, *args, **kwargs)

    monkeypatch.setattr(secagg.SecAggServer, "receive_masked", spy)
    ups = updates({"a": 6}, dim_base=4000)  # long enough that chance correlation is ~0.016
    run(ups, PrivacyConfig(secure_sum={"enabled": True}))
    assert len(seen) == 6 and all(isinstance(m, secagg.MaskedInput) for m in seen)
    plain = {u.client: torch.cat([u.delta_base, u.delta_heads["label"]]).numpy() for u in ups}
    for m in seen:  # a masked input decoded alone is unrelated to its client's update
        words = np.asarray(m.words[: len(plain[m.client])]).view(np.int32).astype(np.float64)
        assert (
            abs(np.corrcoef(words, plain[m.client])[0, 1]) < 0.1
        )  # > 6 standard deviations of chance


def test_small_groups_pool_their_base_updates_and_release_no_head():
    ups = updates({"big": 5, "s1": 2, "s2": 1})
    releases, held, pooled = plan_releases(
        ups, PrivacyConfig(secure_sum={"enabled": True}, min_group_size=3), {}
    )
    assert [r.name for r in releases] == ["big", POOLED] and pooled == ["s1", "s2"] and not held
    out, _ = run(ups, PrivacyConfig(secure_sum={"enabled": True}, min_group_size=3))
    assert out[POOLED].pooled and out[POOLED].delta_heads == {}
    state = ServerState(
        0,
        torch.zeros(30),
        {g: {"label": torch.zeros(6)} for g in ("big", "s1", "s2")},
        {"label": torch.zeros(6)},
    )
    merged = global_merge(state, out)
    assert torch.equal(
        merged.group_heads["s1"]["label"], torch.zeros(6)
    )  # no head sum of two clients
    assert not torch.equal(merged.group_heads["big"]["label"], torch.zeros(6))
    assert "s1-c00" not in merged.assignment and POOLED not in merged.group_heads


def test_a_pool_too_small_sits_the_round_out_and_is_named():
    ups = updates({"big": 4, "tiny": 1})
    releases, held, _ = plan_releases(
        ups, PrivacyConfig(secure_sum={"enabled": True}, min_group_size=3), {}
    )
    assert [r.name for r in releases] == ["big"]
    assert "tiny-c00" in held and "privacy.min_group_size=3" in held["tiny-c00"]


def test_dp_clips_counts_each_client_once_and_divides_by_the_expected_count():
    ups = updates({"a": 4})
    ups[0].delta_base.mul_(1000)  # one huge update: clipped to C
    spec = PrivacyConfig(dp_fedavg={"enabled": True, "noise_multiplier": 1e-9}, min_group_size=2)
    out, report = run(ups, spec, clip=0.5, expected={"a": 5.0})
    vectors = []
    for u in ups:
        v = torch.cat([u.delta_base, u.delta_heads["label"]])
        vectors.append(v * min(1.0, 0.5 / float(v.norm())))
    want = torch.stack(vectors).sum(0) / 5.0
    got = torch.cat([out["a"].delta_base, out["a"].delta_heads["label"]])
    assert torch.allclose(got, want, atol=1e-6)
    assert out["a"].weight == 5.0 and report.under_clip == 3


def test_dp_noise_has_std_z_c_over_the_expected_count():
    spec = PrivacyConfig(dp_fedavg={"enabled": True, "noise_multiplier": 2.0}, min_group_size=2)
    like = updates({"a": 1}, dim_base=4000)[0]
    out, report = private_aggregate(
        [], spec, 0.5, {"a": 4.0}, 1.0, torch.Generator().manual_seed(0), 0, like
    )
    noise = out["a"].delta_base
    assert report.noise_std == pytest.approx(1.0)
    assert float(noise.std()) == pytest.approx(1.0 / 4.0, rel=0.05)  # pure noise: nobody sampled


def test_dp_release_plan_uses_public_expected_sizes_not_who_was_sampled():
    spec = PrivacyConfig(dp_fedavg={"enabled": True}, min_group_size=3)
    ups = updates({"a": 1})  # one sampled client of a group expected to have 4
    releases, held, _ = plan_releases(ups, spec, {"a": 4.0, "b": 1.0})
    assert [r.name for r in releases] == ["a"] and held == {}


def test_poisson_sampling_draws_each_client_independently_at_the_rate():
    from fedmtl.privacy.randomness import SecretRandom

    clients = [f"c{i:03d}" for i in range(1000)]
    secret = SecretRandom.fresh()
    sizes = [
        len(poisson_sample(clients, 0.1, secret.stream("round", r, "participation")))
        for r in range(20)
    ]
    assert 80 < np.mean(sizes) < 120 and len(set(sizes)) > 3
    again = SecretRandom(secret.key)  # the same key (a resume) draws the same sample
    assert poisson_sample(
        clients, 0.1, secret.stream("round", 5, "participation")
    ) == poisson_sample(clients, 0.1, again.stream("round", 5, "participation"))
