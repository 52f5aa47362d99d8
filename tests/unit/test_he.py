"""Homomorphic aggregation with CKKS (fedmtl/privacy/he.py) and its use in private aggregation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from fedmtl.config import (
    PrivacyConfig,  # noqa: E402
    load_config,  # noqa: E402
)
from fedmtl.privacy import he  # noqa: E402
from fedmtl.privacy.aggregation import private_aggregate  # noqa: E402
from fedmtl.server.aggregation import group_aggregate  # noqa: E402
from tests.unit.test_private_aggregation import updates  # noqa: E402


@pytest.fixture(scope="module")
def holder() -> he.KeyHolder:
    return he.KeyHolder()


def vectors(n: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i:03d}": rng.uniform(-1, 1, dim) for i in range(n)}


def test_decrypted_sum_equals_the_plain_sum_within_the_measured_error(holder):
    vs = vectors(30, 5000)  # two chunks: 4096 + 904 values (+ the scalar)
    scalars = {u: (i + 1) / 30 for i, u in enumerate(vs)}
    result = he.encrypted_sum(vs, scalars=scalars, key_holder=holder)
    exact = np.sum(list(vs.values()), axis=0)
    error = np.abs(result.sum - exact).max()
    assert result.sum.shape == (5000,) and result.included == tuple(sorted(vs))
    assert error <= result.error_bound == pytest.approx(30 * he.ERROR_PER_SUMMAND)
    assert error <= 1e-6 and error / np.abs(exact).max() <= 1e-7  # measured ~5e-8 and ~1e-8
    assert result.scalar_sum == pytest.approx(sum(scalars.values()), abs=1e-6)
    assert len(holder.public_context) > 0 and result.bytes_sent["c000"] > 2 * 5000 * 8


def test_the_server_accepts_only_encrypted_inputs(holder):
    server = he.HEServer(holder.public_context, 10, ["a", "b"])
    genuine = he.HEClient("a", holder.public_context).encrypt(np.ones(10))
    plain = np.ones(10)
    fake = type("EncryptedInput", (), {"client": "b", "chunks": (b"x",), "dim": 10})()
    for bad in (torch.ones(10), plain, plain.tobytes(), fake, ("b", genuine.chunks)):
        with pytest.raises(TypeError, match="accepts only EncryptedInput") as info:
            server.receive(bad)
        assert type(bad).__name__ in str(info.value)
    with pytest.raises(TypeError, match="produced only by HEClient"):
        he.EncryptedInput("b", genuine.chunks, 10)
    with pytest.raises(TypeError, match="produced only by HEClient"):
        dataclasses.replace(genuine, client="b")
    server.receive(genuine)
    with pytest.raises(he.HEError, match="unexpected encrypted input from 'a'"):
        server.receive(genuine)  # a replay
    with pytest.raises(TypeError, match="decrypts only an EncryptedSum"):
        holder.decrypt(genuine)  # the key holder never decrypts a single client's input


def test_the_public_context_carries_no_secret_key(holder):
    ts = he.tenseal()
    public = ts.context_from(holder.public_context)
    assert not public.is_private() and public.is_public()
    ciphertext = ts.ckks_vector(public, [0.5, -0.25])
    with pytest.raises(ValueError, match="secret_key"):
        ciphertext.decrypt()
    with_secret = ts.context_from(holder._context.serialize(save_secret_key=True))
    with pytest.raises(he.HEError, match="public context only"):
        he.HEServer(with_secret.serialize(save_secret_key=True), 2, ["a", "b"])


def test_a_dropped_client_is_simply_absent_from_the_sum(holder):
    vs = vectors(6, 100, seed=1)
    dropped = ["c001", "c004"]
    result = he.encrypted_sum(vs, drop=dropped, key_holder=holder)
    exact = np.sum([v for u, v in vs.items() if u not in dropped], axis=0)
    assert result.dropped == tuple(dropped) and "c001" not in result.included
    assert np.abs(result.sum - exact).max() <= result.error_bound
    with pytest.raises(he.HEError, match="at least 2 clients"):
        he.encrypted_sum(vs, drop=list(vs)[1:], key_holder=holder)


def test_tampered_or_garbage_ciphertexts_are_rejected(holder):
    genuine = he.HEClient("a", holder.public_context).encrypt(np.linspace(-1, 1, 50))
    blob = genuine.chunks[0]
    short = he.HEClient("c", holder.public_context).encrypt(np.ones(20))
    for name, chunk in [
        ("garbage", b"not a ciphertext" * 64),
        ("truncated", blob[: len(blob) // 2]),
        ("overwritten", blob[:60] + bytes(200) + blob[260:]),
        ("short", short.chunks[0]),
    ]:
        message = he.EncryptedInput.__new__(he.EncryptedInput)
        object.__setattr__(message, "client", "b")
        object.__setattr__(message, "chunks", (chunk,))
        object.__setattr__(message, "dim", 50)  # a message altered in transit (bypassing the token)
        server = he.HEServer(holder.public_context, 50, ["a", "b"])
        with pytest.raises(he.HEError, match="not a CKKS ciphertext|holds 20 values") as info:
            server.receive(message)
        assert "'b'" in str(info.value), name
    other = he.KeyHolder()  # a ciphertext under another key pair parses but is not this session's
    server = he.HEServer(holder.public_context, 50, ["a", "b"])
    server.receive(genuine)
    server.receive(he.HEClient("b", other.public_context).encrypt(np.zeros(50)))
    assert (
        np.abs(holder.decrypt(server.aggregate()) - np.linspace(-1, 1, 50)).max() > 1.0
    )  # garbage out


def test_overflow_bound_and_bad_scalars_are_refused(holder):
    with pytest.raises(he.HEError, match="plaintext range"):
        he.encrypted_sum(vectors(3, 4), bound=he.MAX_ABS_SUM, key_holder=holder)
    with pytest.raises(he.HEError, match=r"scalars of \['c000'\] are outside ±1"):
        he.encrypted_sum(
            vectors(3, 4), scalars={"c000": 2.0, "c001": 0.5, "c002": 0.5}, key_holder=holder
        )


def test_private_aggregate_with_ckks_matches_secagg_and_plain():
    ups = updates({"a": 5, "b": 4, "s": 2})
    plain = group_aggregate(ups)

    def run(spec):
        return private_aggregate(
            ups, spec, 1.0, {}, 100.0, torch.Generator().manual_seed(1), seed=3
        )

    ckks, report = run(PrivacyConfig(secure_sum={"enabled": True, "protocol": "ckks"}))
    secagg, _ = run(PrivacyConfig(secure_sum={"enabled": True}))
    assert (
        sorted(ckks) == sorted(secagg)
        and report.secagg_seconds > 0
        and not report.dropped_mid_protocol
    )
    for g in ckks:
        assert torch.allclose(ckks[g].delta_base, secagg[g].delta_base, atol=1e-6)
        if g in plain:
            assert torch.allclose(
                ckks[g].delta_heads["label"], plain[g].delta_heads["label"], atol=1e-6
            )
            assert ckks[g].n_samples == plain[g].n_samples


def test_config_names_the_setting_and_the_extra(monkeypatch):
    cfg = load_config(None, ["privacy.secure_sum.enabled=true", "privacy.secure_sum.protocol=ckks"])
    assert cfg.privacy.mechanism == "ckks"
    assert cfg.privacy.secure_sum.protocol == "ckks"
    import fedmtl.config.privacy

    monkeypatch.setattr(fedmtl.config.privacy, "tenseal_installed", lambda: False)
    with pytest.raises(ValueError, match=r"secure_sum.protocol=ckks.*pip install -e '\.\[he\]'"):
        load_config(None, ["privacy.secure_sum.enabled=true", "privacy.secure_sum.protocol=ckks"])
    load_config(None, ["privacy.secure_sum.protocol=ckks"])  # unused without secure_sum.enabled


def test_run_rounds_with_ckks_gives_the_secagg_model(tmp_path):
    from fedmtl.client.store import ClientStore
    from fedmtl.data import partition, prepare
    from fedmtl.data.manifest import read_manifest
    from fedmtl.federation import Federation
    from fedmtl.rounds import run_rounds
    from tests.conftest import tiny_overrides

    models = {}
    for protocol in ("secagg", "ckks"):
        cfg = load_config(
            None,
            tiny_overrides(
                tmp_path,
                **{
                    "privacy.secure_sum.enabled": True,
                    "privacy.secure_sum.protocol": protocol,
                    "privacy.min_group_size": 2,
                    "privacy.evaluation.client_metrics": False,
                },
            ),
        )
        if protocol == "secagg":
            prepare(cfg.data)
            partition(cfg.data)
        manifest = read_manifest(cfg.data.partitions_dir)
        fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / protocol))
        state, _, _ = run_rounds(fed, manifest.client_ids, 1)  # one round: ~6 s each on 2 cores
        models[protocol] = (state, fed.evaluate_pooled(manifest.client_ids, state))
    (s1, pooled1), (s2, pooled2) = models["secagg"], models["ckks"]
    assert torch.allclose(s1.base, s2.base, atol=1e-5) and not torch.equal(
        s1.base, torch.zeros_like(s1.base)
    )
    for g in s1.group_heads:
        assert torch.allclose(s1.group_heads[g]["label"], s2.group_heads[g]["label"], atol=1e-5)
    assert pooled2["personal/accuracy/pooled"] == pytest.approx(
        pooled1["personal/accuracy/pooled"], abs=1e-6
    )
