"""What the registered model may hold (no Prefect engine, no MLflow store): no personal head
unless opted into (and never under DP), a synthetic input example, warm start from a bundle
without personal heads; the artifact hash check on its own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedmtl.client.store import ClientStore
from fedmtl.config import ConfigError, load_config
from fedmtl.data import partition, prepare
from fedmtl.federation import Federation
from fedmtl.lifecycle.warmstart import seed_store, state_from_bundle
from fedmtl.rounds import run_rounds
from models.personalized import CLIENT_COLUMN, PersonalizedPredictor
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-privacy")
    cfg = load_config(None, tiny_overrides(root, **{"model.hidden": "[16]"}))
    prepare(cfg.data)
    manifest = partition(cfg.data)
    fed = Federation.from_config(cfg, manifest, ClientStore(root / "store"))
    state, _, _ = run_rounds(fed, manifest.client_ids, 2)
    return root, cfg, manifest, fed, state


def test_personal_heads_are_not_bundled_by_default(trained):
    from flows.registration import make_bundle

    root, cfg, manifest, fed, state = trained
    assert cfg.tracking.bundle_personal_heads is False
    assert (
        yaml.safe_load((REPO / "params.yaml").read_text())["tracking"]["bundle_personal_heads"]
        is False
    )
    assert all(fed.store.load(c).heads for c in manifest.client_ids)  # the clients hold theirs
    bundle = make_bundle(fed, state, cfg)
    assert bundle.personal_heads == {} and bundle.personal_bases == {}
    predictor = PersonalizedPredictor(bundle)
    assert (
        predictor.heads_for(manifest.client_ids[0])[0] == "group"
    )  # a known client: its group's head
    assert predictor.heads_for("never-seen")[0] == "global"

    opted = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"bundle_personal_heads": True})}
    )
    assert set(make_bundle(fed, state, opted).personal_heads) == set(
        manifest.client_ids
    )  # the explicit opt-in


@pytest.mark.parametrize("privacy", ["privacy.dp_fedavg.enabled", "privacy.dp_sgd.enabled"])
def test_bundling_personal_heads_is_refused_under_dp(trained, privacy, tmp_path):
    from cli import app
    from flows.registration import make_bundle

    root, cfg, manifest, fed, state = trained
    with pytest.raises(
        ConfigError,
        match=rf"tracking.bundle_personal_heads=true with {privacy}=true: .*outside "
        r"the DP guarantee",
    ):
        load_config(
            None, tiny_overrides(root, **{"tracking.bundle_personal_heads": True, privacy: True})
        )
    load_config(None, tiny_overrides(root, **{privacy: True}))  # DP alone is fine
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    res = CliRunner().invoke(
        app,
        [
            "train",
            "-p",
            str(params),
            "-s",
            "tracking.bundle_personal_heads=true",
            "-s",
            f"{privacy}=true",
        ],
    )
    assert (
        res.exit_code == 2
        and "tracking.bundle_personal_heads" in res.output
        and privacy in res.output
    )

    # settings that bypassed validation (model_copy) are refused by make_bundle itself
    section = privacy.split(".")[1]
    mechanism = getattr(cfg.privacy, section).model_copy(update={"enabled": True})
    bad = cfg.model_copy(
        update={
            "tracking": cfg.tracking.model_copy(update={"bundle_personal_heads": True}),
            "privacy": cfg.privacy.model_copy(update={section: mechanism}),
        }
    )
    with pytest.raises(
        ValueError, match="tracking.bundle_personal_heads=true with DP-FedAvg or DP-SGD"
    ):
        make_bundle(fed, state, bad)


def test_the_input_example_is_synthetic(trained):
    from flows.registration import EXAMPLE_CLIENT, input_example, make_bundle

    root, cfg, manifest, fed, state = trained
    example = input_example(fed)
    assert list(example.columns) == [CLIENT_COLUMN, *manifest.features]
    assert (
        set(example[CLIENT_COLUMN]) == {EXAMPLE_CLIENT}
        and EXAMPLE_CLIENT not in manifest.client_ids
    )
    assert (example[manifest.features].to_numpy() == 0).all() and example[
        manifest.features
    ].dtypes.eq("float64").all()
    assert set(PersonalizedPredictor(make_bundle(fed, state, cfg)).predict(example)["head"]) == {
        "global"
    }

    renamed = dataclasses.replace(
        manifest,
        clients=[
            dataclasses.replace(manifest.clients[0], client=EXAMPLE_CLIENT),
            *manifest.clients[1:],
        ],
    )
    clash = Federation.from_config(cfg, renamed, ClientStore(root / "clash"))
    assert EXAMPLE_CLIENT in clash.manifest.client_ids
    assert not set(input_example(clash)[CLIENT_COLUMN]) & set(clash.manifest.client_ids)


def test_warm_start_from_a_bundle_without_personal_heads(trained):
    from flows.registration import make_bundle

    root, cfg, manifest, fed, state = trained
    bundle = make_bundle(fed, state, cfg)
    fresh = Federation.from_config(cfg, manifest, ClientStore(root / "warm"))
    start, personal = state_from_bundle(fresh, bundle, "champion version 1")
    assert personal == {} and start.round == state.round and torch.equal(start.base, state.base)
    seed_store(fresh.store, personal, start.round)
    after, _, history = run_rounds(fresh, manifest.client_ids, 1, state=start)
    assert after.round == state.round + 1 and len(history) == 1
    assert all(
        fresh.store.load(c).heads for c in manifest.client_ids
    )  # each client fitted its own again


def _model_folder(root: Path) -> Path:
    (root / "artifacts").mkdir(parents=True)
    (root / "MLmodel").write_text("python_function: {}\n")
    (root / "serving.py").write_text("print('hello')\n")
    (root / "artifacts/bundle.pt").write_bytes(b"\x00" * 10)
    return root


def test_the_hash_check_refuses_a_changed_missing_or_extra_file(tmp_path):
    from tasks.registry import (
        ModelIntegrityError,
        ModelRef,
        artifact_hashes,
        hashes_tag_value,
        verify,
    )

    folder = _model_folder(tmp_path / "m")
    hashes = artifact_hashes(folder)
    assert set(hashes) == {"MLmodel", "serving.py", "artifacts/bundle.pt"}
    tag = hashes_tag_value(hashes)
    assert json.loads(tag) == hashes and len(tag) < 5000
    ref = ModelRef("file:///x", "version 7 of registered model 'm'", tag, "the version's tag")
    verify(ref, folder)
    # MLflow itself writes registered_model_meta into a local store's folder when the version is
    # loaded by its models:/ URI; nothing loads it, so it is not a change (but a sub-folder's is)
    (folder / "registered_model_meta").write_text("model_name: m\nmodel_version: '7'\n")
    verify(ref, folder)
    (folder / "artifacts/registered_model_meta").write_text("")
    with pytest.raises(
        ModelIntegrityError, match="'artifacts/registered_model_meta' was not part of the model"
    ):
        verify(ref, folder)
    (folder / "artifacts/registered_model_meta").unlink()

    (folder / "serving.py").write_text("import os; os.system('true')\n")
    with pytest.raises(
        ModelIntegrityError,
        match=r"version 7 of registered model 'm' failed its integrity check: "
        r"artifact 'serving.py' does not match its recorded SHA-256",
    ):
        verify(ref, folder)
    (folder / "serving.py").write_text("print('hello')\n")
    (folder / "artifacts/extra.py").write_text("")
    with pytest.raises(
        ModelIntegrityError, match="artifact 'artifacts/extra.py' was not part of the model"
    ):
        verify(ref, folder)
    (folder / "artifacts/extra.py").unlink()
    (folder / "MLmodel").unlink()
    with pytest.raises(ModelIntegrityError, match="artifact 'MLmodel' is missing"):
        verify(ref, folder)
    for value in (None, "", "not json", "{}", json.dumps({"MLmodel": "abc"})):
        with pytest.raises(
            ModelIntegrityError, match="no recorded artifact hashes|not a JSON object"
        ):
            verify(dataclasses.replace(ref, hashes=value), folder)
    with pytest.raises(ValueError, match="more than an MLflow tag holds"):
        hashes_tag_value({f"f{i:04d}": "0" * 64 for i in range(100)})


def test_the_served_model_refuses_non_finite_features_and_unbounded_cold_starts(trained):
    """What a scoring request may not do: send NaN/inf (or float32-overflowing) features, which
    were answered with a meaningless class, or ask the server for unbounded cold-start fits."""
    import numpy as np
    import pandas as pd

    from flows.registration import make_bundle
    from models import personalized

    root, cfg, manifest, fed, state = trained
    predictor = PersonalizedPredictor(make_bundle(fed, state, cfg))
    features = list(manifest.features)
    frame = pd.DataFrame(0.0, index=range(3), columns=features)
    frame.insert(0, CLIENT_COLUMN, manifest.client_ids[0])
    assert len(predictor.predict(frame)) == 3
    for bad in (np.nan, np.inf, 1e300):
        broken = frame.copy()
        broken.loc[1, features[5]] = bad
        with pytest.raises(
            ValueError, match=rf"feature column\(s\) \['{features[5]}'\] hold 1 missing, infinite"
        ):
            predictor.predict(broken)
    text = frame.astype({features[2]: object})
    text.loc[0, features[2]] = "abc"
    with pytest.raises(ValueError, match=f"'{features[2]}'.*not numbers"):
        predictor.predict(text)

    label = manifest.tasks[0].name
    many = pd.concat(
        [
            frame.head(1).assign(**{CLIENT_COLUMN: f"new-{i}", label: manifest.tasks[0].classes[0]})
            for i in range(personalized.MAX_COLD_START_CLIENTS + 1)
        ],
        ignore_index=True,
    )
    with pytest.raises(
        ValueError, match=f"labelled rows for {personalized.MAX_COLD_START_CLIENTS + 1} unknown"
    ):
        predictor.predict(many)
    assert set(predictor.predict(many.iloc[:-1])["head"]) == {"cold-start"}  # at the limit: fitted
    known = many.assign(**{CLIENT_COLUMN: manifest.client_ids[0]})  # known clients fit nothing
    assert set(predictor.predict(known)["head"]) == {"group"}
