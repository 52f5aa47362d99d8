"""Warm start from a trained bundle: exact tensors, continued rounds, clear shape errors (no
Prefect)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.lifecycle.warmstart import WarmStartError, seed_store, state_from_bundle
from fedmtl.rounds import run_rounds
from models.personalized import PersonalizedBundle
from tests.conftest import tiny_overrides


def bundle_of(fed: Federation, state, cfg) -> PersonalizedBundle:
    """What flows.registration.make_bundle builds (without importing Prefect)."""
    personal = {c: fed.store.load(c).heads for c in fed.manifest.client_ids if fed.store.load(c)}
    return PersonalizedBundle(
        model_cfg=cfg.model.model_dump(mode="json"),
        features=list(fed.manifest.features),
        tasks=[
            {"name": t.name, "kind": t.kind, "classes": list(t.classes)} for t in fed.manifest.tasks
        ],
        input_shape=fed.manifest.input_shape,
        base=state.base,
        global_heads=state.global_heads,
        group_heads=state.group_heads,
        client_groups={c: g for c, g in state.assignment.items() if g in state.group_heads},
        personal_heads=personal,
        round=state.round,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    cfg = load_config(None, tiny_overrides(root, **{"model.hidden": "[16]"}))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def make(store_dir: str, overrides: dict | None = None) -> Federation:
        c = load_config(None, tiny_overrides(root, **{"model.hidden": "[16]", **(overrides or {})}))
        return Federation.from_config(c, manifest, ClientStore(root / store_dir))

    fed = make("first")
    state, _, _ = run_rounds(fed, manifest.client_ids, 2)
    return make, manifest, state, bundle_of(fed, state, cfg)


def test_bundle_becomes_the_same_state_and_personal_heads(trained):
    make, manifest, state, bundle = trained
    fed = make("second")
    start, personal = state_from_bundle(fed, bundle, "champion version 1")
    assert start.round == 2
    assert torch.equal(start.base, state.base)
    assert (
        start.base.data_ptr() != bundle.base.data_ptr()
    )  # a copy: training never writes into the bundle
    assert set(start.group_heads) == set(state.group_heads)
    for g, heads in state.group_heads.items():
        assert all(torch.equal(start.group_heads[g][t], v) for t, v in heads.items())
    assert all(torch.equal(start.global_heads[t], v) for t, v in state.global_heads.items())
    assert start.assignment == {c.client: c.group for c in manifest.clients}
    assert set(personal) == set(manifest.client_ids)
    seed_store(fed.store, personal, start.round)
    for client in manifest.client_ids:
        assert torch.equal(
            fed.store.load(client).heads["label"], bundle.personal_heads[client]["label"]
        )


def test_warm_started_rounds_continue(trained):
    make, manifest, state, bundle = trained
    fed = make("third")
    start, personal = state_from_bundle(fed, bundle)
    seed_store(fed.store, personal, start.round)
    after, _, history = run_rounds(fed, manifest.client_ids, 1, state=start)
    assert after.round == 3 and len(history) == 1
    assert not torch.equal(after.base, state.base)


def test_mismatches_are_refused_with_the_reason(trained):
    make, manifest, state, bundle = trained
    fed = make("fourth")
    label = "champion version 3 of 'm'"
    fewer = dataclasses.replace(bundle, features=bundle.features[:60])
    with pytest.raises(
        WarmStartError,
        match=r"champion version 3 of 'm': it has 60 features, the data has 64: "
        r"train with training.warm_start=none",
    ):
        state_from_bundle(fed, fewer, label)
    renamed = dataclasses.replace(bundle, features=["f0", *bundle.features[1:]])
    with pytest.raises(WarmStartError, match="feature 0 is 'f0' in the model, 'x0' in the data"):
        state_from_bundle(fed, renamed, label)
    tasks = [{**bundle.tasks[0], "classes": bundle.tasks[0]["classes"][:-1]}]
    with pytest.raises(
        WarmStartError, match=r"task 'label' has classes \[0, 1, .*8\] in the model"
    ):
        state_from_bundle(fed, dataclasses.replace(bundle, tasks=tasks), label)
    with pytest.raises(
        WarmStartError, match=r"model.hidden is \[16\] in the model, \[8\] in the settings"
    ):
        state_from_bundle(make("fifth", {"model.hidden": "[8]"}), bundle, label)
    short = dataclasses.replace(bundle, base=bundle.base[:-1])
    with pytest.raises(
        WarmStartError,
        match=f"the shared base has {bundle.base.numel() - 1} parameters, "
        f"the current settings need {bundle.base.numel()}",
    ):
        state_from_bundle(fed, short, label)
    client = manifest.client_ids[0]
    bad = {**bundle.personal_heads, client: {"label": torch.zeros(3)}}
    with pytest.raises(
        WarmStartError, match=f"personal head of client '{client}' for task 'label' has 3"
    ):
        state_from_bundle(fed, dataclasses.replace(bundle, personal_heads=bad), label)
    assert fed.store.clients() == []  # nothing was written on the way to an error


def test_old_bundles_without_a_round_load_as_round_zero(trained):
    _, _, _, bundle = trained
    raw = bundle.to_dict()
    raw.pop("round")
    assert PersonalizedBundle.from_dict(raw).round == 0
