"""GPFL's defining properties: the conditional valve splits a global and a personalised feature,
the GCE's guidance is what the shared modules learn from, and only the shared modules travel."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmtl.algorithms.gpfl import GPFL, class_frequencies, guidance_loss
from fedmtl.client.store import ClientStore
from fedmtl.client.training import load_weights
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from tests.conftest import tiny_overrides, with_settings


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    """The tiny digits federation (8 clients, 2 label-permutation groups) running GPFL."""
    root = tmp_path_factory.mktemp("gpfl")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    plain = Federation.from_config(
        with_settings(cfg, {"algorithm.method": "fedavg"}), manifest, ClientStore(root / "store")
    )
    return dataclasses.replace(plain, algorithm=GPFL())


def first_client(fed: Federation, round_: int = 0):
    client = fed.manifest.client_ids[0]
    return fed.context(client, round_), fed.initial_state(), fed.data(client)


def test_only_the_extractor_cov_and_gce_are_released(fed):
    ctx, state, data = first_client(fed)
    base = ctx.model.base
    parts = [base.extractor, base.cov, base.gce]
    sizes = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert state.base.numel() == sum(sizes)  # the base vector: extractor, CoV, GCE, nothing else

    update, personal = fed.algorithm.client_round(ctx, state, data, "all", None)
    assert update.delta_heads == {}  # no head, personal or global, is released
    assert update.delta_base.shape == state.base.shape
    for part, delta in zip(("extractor", "cov", "gce"), torch.split(update.delta_base, sizes)):
        assert torch.count_nonzero(delta) > 0, f"{part} was not trained"

    # what stays: the head trained on f_P, and (in it) the CoV's affine at p_c (made from the
    # received GCE and the client's labels), which no released vector holds
    load_weights(ctx.model, state.base, state.global_heads)
    own = base.personal_input(class_frequencies(data, ctx.tasks))
    load_weights(ctx.model, state.base + update.delta_base, personal.heads)
    head = ctx.model.heads["label"]
    with torch.no_grad():
        gamma, beta = base.cov.affine(own)
    assert float(head.guided.detach()) == 0.0
    assert torch.allclose(head.gamma, gamma) and torch.allclose(head.beta, beta)
    linear = slice(2 * base.dim + 1, None)  # a head's vector: γ, β, s, then the linear layer
    assert not torch.allclose(personal.heads["label"][linear], state.global_heads["label"][linear])


@torch.no_grad()
def test_global_and_personalised_features_differ_by_their_conditional_input(fed):
    ctx, state, data = first_client(fed)
    load_weights(ctx.model, state.base, state.global_heads)
    base = ctx.model.base
    generic = base.generic_input()
    own = base.personal_input(class_frequencies(data, ctx.tasks))
    assert not torch.allclose(generic, own)
    feature = base.extractor(data.x_train)
    f_global, f_personal = base.cov(feature, generic), base.cov(feature, own)
    assert (f_global - f_personal).abs().max() > 1e-2
    # the difference is the conditioning alone: a client with uniform labels has p_c = g
    uniform = {"label": torch.full((10,), 0.1)}
    assert torch.allclose(base.personal_input(uniform), generic, atol=1e-6)
    assert torch.allclose(base.cov(feature, base.personal_input(uniform)), f_global, atol=1e-5)


def test_the_gce_guidance_loss_decreases_over_local_training(fed):
    f = dataclasses.replace(fed, local=dataclasses.replace(fed.local, epochs=2))
    ctx, state, data = first_client(f)
    update, _ = f.algorithm.client_round(ctx, state, data, "all", None)
    assert update.metrics["gpfl_guidance"] < update.metrics["gpfl_guidance_start"]

    # recomputed from the vectors: the received modules against the released ones, with the
    # round's constants (g and the embeddings as received)
    model = ctx.model
    load_weights(model, state.base, state.global_heads)
    generic = model.base.generic_input()
    frozen = {t: e.detach().clone() for t, e in model.base.embeddings().items()}

    def guidance(base_vector: torch.Tensor) -> float:
        load_weights(model, base_vector, state.global_heads)
        model.eval()
        with torch.no_grad():
            f_global = model.base.cov(model.base.extractor(data.x_train), generic)
            return float(guidance_loss(model.base, f_global, data.y_train, frozen, 0.01))

    assert guidance(state.base + update.delta_base) < guidance(state.base)


def test_the_scored_variants_are_gpfls_two_routes(fed):
    ctx, state, data = first_client(fed)
    update, personal = fed.algorithm.client_round(ctx, state, data, "all", None)
    state = dataclasses.replace(state, base=state.base + update.delta_base)
    base_vector, heads, _ = fed.algorithm.personalized(ctx, state, data, "all", personal)
    model, x = ctx.model, data.x_test
    model.eval()
    with torch.no_grad():
        load_weights(model, base_vector, heads)  # as evaluation scores the personal variant
        scored = model(x)["label"]
        load_weights(model, state.base, personal.heads)
        base = model.base
        own = base.personal_input(class_frequencies(data, ctx.tasks))
        route = model.heads["label"].linear(base.cov(base.extractor(x), own))  # head(CoV(φ, p_c))
        assert torch.allclose(scored, route, atol=1e-5)

        load_weights(model, state.base, state.global_heads)  # global variant: the GCE classifier
        cosines = base.cosines(base.cov(base.extractor(x), base.generic_input()))["label"]
        assert torch.allclose(model(x)["label"], cosines, atol=1e-6)
    # a client that has not trained yet is scored on the global route
    assert fed.algorithm.personalized(ctx, state, data, "all", None)[1] is state.global_heads


def test_rounds_through_the_federation_keep_heads_local_and_score_finite(fed, tmp_path):
    f = dataclasses.replace(fed, store=ClientStore(tmp_path / "store"))
    start = f.initial_state()
    state, records, history = run_rounds(f, f.manifest.client_ids, 2)
    for variant in ("global", "group", "personal"):
        acc = history[-1][f"{variant}/accuracy/mean"]
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0, variant
    assert set(records["variant"]) == {"global", "group", "personal"}
    assert not torch.equal(state.base, start.base)
    # the server's heads are round 0's (no head was ever released); every client kept its own
    for task, head in start.global_heads.items():
        assert torch.equal(state.global_heads[task], head)
    for client in f.manifest.client_ids:
        kept = f.store.load(client)
        assert kept is not None and set(kept.heads) == {"label"}
