"""Cold start end to end: a tiny federation without one client, its model registered in a temp
MLflow store; that client's rows, under an id the model has never seen, then personalise through
the served pyfunc and `fedmtl personalize`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import mlflow
from cli import app
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import load_partition, partition, prepare
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from models.personalized import PersonalizedPredictor
from tests.conftest import tiny_overrides

MODEL = "fedmtl-coldstart-test"
runner = CliRunner()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from flows.registration import input_example, make_bundle
    from tasks.registry import log_personalized_model

    root = tmp_path_factory.mktemp("coldstart")
    cfg = load_config(
        None, tiny_overrides(root, **{"training.rounds": 3, "training.local_epochs": 2})
    )
    prepare(cfg.data)
    manifest = partition(cfg.data)
    held = manifest.clients[-1]
    trained = [c for c in manifest.client_ids if c != held.client]
    fed = Federation.from_config(cfg, manifest, ClientStore(root / "store"))
    state, _, _ = run_rounds(fed, trained, cfg.training.rounds)
    bundle = make_bundle(fed, state, cfg)

    (root / "mlflow").mkdir()
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.create_experiment(
        "coldstart", artifact_location=str(root / "mlflow/artifacts")
    )
    run_id = client.create_run(experiment).info.run_id
    log_personalized_model(run_id, bundle, input_example(fed), MODEL)
    client.set_terminated(run_id)

    part = load_partition(cfg.data.partitions_dir, held.client)
    features = list(manifest.features)
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        bundle=bundle,
        held="newcomer",
        group=held.group,
        known=trained[0],
        features=features,
        uri=f"models:/{MODEL}@challenger",
        tracking=cfg.tracking.tracking_uri,
        support=part[part["split"] == "train"]
        .head(10)[[*features, "label"]]
        .reset_index(drop=True),
        test=part[part["split"] == "test"][[*features, "label"]].reset_index(drop=True),
    )


def test_served_model_cold_starts_an_unknown_client_from_its_labelled_rows(registered):
    r = registered
    mlflow.set_tracking_uri(r.tracking)
    loaded = mlflow.pyfunc.load_model(r.uri)
    optional = {c.name: c.required for c in loaded.metadata.get_input_schema().inputs}
    assert optional["label"] is False and optional["client_id"] is True

    unlabelled = r.test.assign(label=np.nan)
    frame = pd.concat(
        [
            r.support.assign(client_id=r.held),  # the support set: labelled
            unlabelled.assign(client_id=r.held),  # the rows to predict
            r.test.head(3).assign(client_id=r.known),  # a trained client: labels ignored
            unlabelled.head(3).assign(client_id="stranger"),  # unknown, no labels
        ],
        ignore_index=True,
    )[["client_id", *r.features, "label"]]
    served = loaded.predict(frame)
    heads = served["head"].groupby(frame["client_id"]).unique().map(set).to_dict()
    # personal heads stay on the clients (not bundled by default): a trained client gets its group's
    assert heads == {r.held: {"cold-start"}, r.known: {"group"}, "stranger": {"global"}}

    predictor = PersonalizedPredictor(r.bundle)
    pd.testing.assert_frame_equal(
        served.reset_index(drop=True),
        predictor.predict(frame).reset_index(drop=True),
        check_dtype=False,
    )
    done = predictor.cold_start(r.held, r.support)
    assert done.group == r.group and done.n_labelled == 10
    rows = frame["client_id"] == r.held
    direct = predictor.predict(frame[rows], overrides={r.held: (done.source, done.heads)})
    assert served.loc[rows, "label"].tolist() == direct["label"].tolist()

    # without label columns: the behaviour before cold start (unknown client -> global heads)
    plain = loaded.predict(frame.drop(columns=["label"]))
    assert set(plain.loc[rows, "head"]) == {"global"}
    with pytest.raises(Exception, match=r"label 42 of task 'label' is not in the declared classes"):
        loaded.predict(frame.assign(label=frame["label"].where(~rows, 42)))


def personalize(r, *args):
    return runner.invoke(app, ["personalize", *map(str, args)])


def test_cli_personalizes_reports_the_group_and_accuracy_and_writes_predictions(
    registered, tmp_path
):
    r = registered
    support, target, out = (
        tmp_path / "support.csv",
        tmp_path / "predict.parquet",
        tmp_path / "pred.csv",
    )
    r.support.to_csv(support, index=False)
    r.test.assign(row_id=np.arange(len(r.test))).to_parquet(target)
    res = personalize(
        r,
        support,
        "--model",
        r.uri,
        "--tracking-uri",
        r.tracking,
        "--client-id",
        r.held,
        "--predict",
        target,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    assert f"10 labelled rows; chose group {r.group}" in res.output
    written = pd.read_csv(out)
    assert list(written.columns) == ["row_id", "client_id", "label", "head"]
    assert len(written) == len(r.test) and set(written["head"]) == {"cold-start"}
    acc = float((written["label"].to_numpy() == r.test["label"].to_numpy()).mean())
    assert f"(label, {len(r.test)} labelled rows): {acc:.3f}" in res.output
    assert f"│ {r.group} (chosen)" in res.output

    # the same from the bundle file, without MLflow
    bundle_file = tmp_path / "bundle.pt"
    torch.save(r.bundle.to_dict(), bundle_file)
    out2 = tmp_path / "pred2.csv"
    res = personalize(
        r,
        support,
        "--model",
        bundle_file,
        "--client-id",
        r.held,
        "--predict",
        target,
        "--out",
        out2,
    )
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_csv(out2), written)

    # no labels: the global heads
    r.support.drop(columns=["label"]).to_csv(support, index=False)
    res = personalize(r, support, "--model", bundle_file, "--out", out2)
    assert res.exit_code == 0, res.output
    assert "no labelled rows" in res.output and set(pd.read_csv(out2)["head"]) == {"global"}


def test_cli_errors_are_named_with_exit_code_2(registered, tmp_path):
    r = registered
    good = tmp_path / "support.csv"
    r.support.to_csv(good, index=False)
    model = ["--model", r.uri, "--tracking-uri", r.tracking]

    res = personalize(r, tmp_path / "absent.csv", *model)
    assert res.exit_code == 2 and "absent.csv' does not exist" in res.output

    thin = tmp_path / "thin.csv"
    r.support.drop(columns=["x3", "x40"]).to_csv(thin, index=False)
    res = personalize(r, thin, *model)
    assert res.exit_code == 2 and "missing feature column(s) x3, x40" in res.output

    res = personalize(
        r, good, "--model", "models:/no-such-model@challenger", "--tracking-uri", r.tracking
    )
    assert (
        res.exit_code == 2 and "cannot load model 'models:/no-such-model@challenger'" in res.output
    )

    res = personalize(r, good, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert (
        res.exit_code == 2
        and "does not exist" in res.output
        and not (tmp_path / "none.db").exists()
    )

    wrong = tmp_path / "wrong.csv"
    r.support.assign(label=r.support["label"].where(r.support.index != 2, 42)).to_csv(
        wrong, index=False
    )
    res = personalize(r, wrong, *model, "--client-id", "newbie")
    assert res.exit_code == 2
    assert "client 'newbie': label 42 of task 'label' is not in the declared classes" in res.output
