"""Champion/challenger for real: two models trained by the Prefect flow into a temp MLflow
registry, judged by `fedmtl promote`, rolled back by `fedmtl rollback`, and the champion
served by MLflow's scoring server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import mlflow
from cli import app
from fedmtl.config import load_config
from fedmtl.data import load_partition, partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from models.personalized import PersonalizedPredictor
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
runner = CliRunner()
MODEL = "fedmtl-promotion-test"


@pytest.fixture(scope="module")
def registry(prefect_harness, tmp_path_factory):
    from flows.training import federated_training

    root = tmp_path_factory.mktemp("promotion")
    overrides = tiny_overrides(
        root,
        **{
            "tracking.registered_model": MODEL,
            "tracking.client_runs": "false",
            # opt in: promotion scores each client through its personal head
            "tracking.bundle_personal_heads": "true",
        },
    )
    cfg = load_config(None, overrides)
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    weak = federated_training(
        load_config(None, [*overrides, "training.rounds=1"]).model_dump(mode="json")
    )
    strong = federated_training(
        load_config(None, [*overrides, "training.rounds=4"]).model_dump(mode="json")
    )
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        overrides=overrides,
        weak=weak,
        strong=strong,
        client=MlflowClient(cfg.tracking.tracking_uri),
    )


def cli(r, *args: str, extra: tuple[str, ...] = ()):
    sets = [a for o in (*r.overrides, *extra) for a in ("--set", o)]
    return runner.invoke(app, [*args, *sets])


def alias(r, name: str = "champion") -> str | None:
    try:
        return str(r.client.get_model_version_by_alias(MODEL, name).version)
    except mlflow.exceptions.MlflowException:
        return None


def tags(r, version: str) -> dict[str, str]:
    return r.client.get_model_version(MODEL, version).tags


def flat(text: str) -> str:
    return " ".join(text.split())


def test_promote_reject_promote_and_rollback(registry):
    r = registry
    v1, v2 = r.weak["model_version"], r.strong["model_version"]
    assert (v1, v2) == ("1", "2") and alias(r) is None

    # the first model: no champion yet, the absolute gates alone
    res = cli(r, "promote", "--challenger", v1, "--actor", "alice")
    assert res.exit_code == 0, res.output
    assert "promoted" in res.output and "(the first champion)" in res.output
    assert alias(r) == v1
    t = tags(r, v1)
    assert t["promotion.decision"] == "promoted" and t["promotion.by"] == "alice"
    assert t["promotion.replaced_version"] == "none" and t["promotion.compared_with"] == "none"
    # nothing moved the champion while it was judged; the old, ambiguous tag name is gone
    assert t["promotion.champion_moved_meanwhile"] == "no" and "promotion.champion_changed" not in t
    assert "promotion.champion_mean" not in t
    out = flat(res.output)
    assert f"judging version {v1} (MLflow run {r.weak['mlflow_run_id']}, method fedmtl)" in out
    assert "champion: none yet" in out and out.index("judging version") < out.index("gate")
    record = r.client.get_run(t["promotion.record_run"])
    assert record.info.status == "FINISHED" and record.data.tags["decision"] == "promoted"
    assert r.client.get_experiment(record.info.experiment_id).name == "fedmtl-promotions"
    assert record.info.artifact_uri.startswith(
        (r.root / "mlflow/artifacts").as_uri()
    )  # not ./mlruns
    decision = json.loads(
        Path(
            r.client.download_artifacts(record.info.run_id, "decision.json", str(r.root))
        ).read_text()
    )
    assert decision["by"] == "alice" and decision["champion_mean"] is None
    assert {c["name"] for c in decision["checks"]} == {"min_metric", "validation"}

    # a dry run changes nothing
    res = cli(r, "promote", "--dry-run")
    assert res.exit_code == 0 and "nothing was changed" in res.output
    assert alias(r) == v1 and "promotion.decision" not in tags(r, v2)

    # a gate that cannot pass: rejected, exit code 3, reasons on the version, champion stays
    res = cli(r, "promote", extra=("promotion.min_gain=0.9",))
    assert res.exit_code == 3, res.output
    assert "rejected" in res.output and "FAIL" in res.output
    assert alias(r) == v1
    t = tags(r, v2)
    assert (
        t["promotion.decision"] == "rejected" and "promotion.min_gain 0.9" in t["promotion.reasons"]
    )
    assert t["promotion.compared_with"] == v1 and float(t["promotion.challenger_mean"]) > 0
    # each version answered with its own weights (both are loaded at once: never the same model
    # twice)
    assert float(t["promotion.challenger_mean"]) == pytest.approx(r.strong["personal_f1"], abs=1e-5)
    assert float(t["promotion.champion_mean"]) == pytest.approx(r.weak["personal_f1"], abs=1e-5)

    # permissive gates: the challenger (alias) replaces the champion, which keeps a tag
    res = cli(
        r,
        "promote",
        extra=(
            "promotion.min_gain=-1",
            "promotion.max_client_regression=1",
            "promotion.worst_fraction=1",
        ),
    )
    assert res.exit_code == 0, res.output
    assert alias(r) == v2 and f"was version {v1}" in res.output
    out = flat(res.output)
    assert (
        f"judging version {v2} (MLflow run {r.strong['mlflow_run_id']}, method fedmtl) "
        "(alias challenger)" in out
    )
    assert f"champion: version {v1} (MLflow run {r.weak['mlflow_run_id']}, method fedmtl)" in out
    assert "note:" not in out  # same method, and no other version to suggest
    assert tags(r, v1)["previous_champion"] == "true" and tags(r, v1)["replaced_by"] == v2
    assert tags(r, v2)["promotion.replaced_version"] == v1
    per_client = pd.read_csv(
        r.client.download_artifacts(
            tags(r, v2)["promotion.record_run"], "per_client.csv", str(r.root)
        )
    )
    assert {"client", "challenger", "champion", "delta"} <= set(per_client.columns) and len(
        per_client
    ) == 8

    # promoting the champion again is an error, not a decision
    res = cli(r, "promote", "--challenger", v2)
    assert res.exit_code == 2 and "already the champion" in res.output

    # rollback: the previous champion is back, and the rolled-back version says so
    res = cli(r, "rollback", "--reason", "regression seen in production", "--actor", "bob")
    assert res.exit_code == 0, res.output
    assert f"version {v2} -> {v1}" in res.output and alias(r) == v1
    t2 = tags(r, v2)
    assert t2["promotion.decision"] == "rolled_back" and t2["rolled_back_by"] == "bob"
    assert t2["rolled_back_reason"] == "regression seen in production"
    assert "previous_champion" not in tags(r, v1) and "restored_at" in tags(r, v1)
    res = cli(r, "rollback")
    assert res.exit_code == 2 and "replaced no earlier champion" in res.output

    # promoted again: the rolled-back version's tags say what is true now, not what was
    res = cli(
        r,
        "promote",
        "--challenger",
        v2,
        extra=(
            "promotion.min_gain=-1",
            "promotion.max_client_regression=1",
            "promotion.worst_fraction=1",
        ),
    )
    assert res.exit_code == 0, res.output
    t2 = tags(r, v2)
    assert (
        alias(r) == v2
        and t2["promotion.decision"] == "promoted"
        and t2["promotion.replaced_version"] == v1
    )
    assert t2["promotion.champion_moved_meanwhile"] == "no" and t2["promotion.compared_with"] == v1
    assert not {
        "rolled_back_by",
        "rolled_back_at",
        "rolled_back_reason",
        "rolled_back_record_run",
        "previous_champion",
        "replaced_by",
        "demoted_at",
        "restored_at",
    } & set(t2)
    assert tags(r, v1)["previous_champion"] == "true" and tags(r, v1)["replaced_by"] == v2


def test_evaluate_scores_every_client_through_the_models_routing(registry):
    r = registry
    out = r.root / "scores.csv"
    res = cli(r, "evaluate", "--model", r.strong["model_version"], "--out", str(out))
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(out)
    assert len(scores) == 8 and set(scores["head"]) == {"personal"}
    # the routed model's per-client accuracy equals the flow's own personalised evaluation
    assert scores["accuracy"].mean() == pytest.approx(r.strong["personal_accuracy"], abs=1e-9)
    res = cli(r, "evaluate", "--model", "nonesuch")
    assert res.exit_code == 2 and "nonesuch" in res.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_like_the_model_in_memory(registry):
    r = registry
    res = cli(
        r, "promote", "--challenger", r.weak["model_version"], extra=("promotion.min_gain=-1",)
    )
    assert alias(r) is not None, res.output
    champion = alias(r)
    bundle = r.weak["bundle"] if champion == r.weak["model_version"] else r.strong["bundle"]
    manifest = read_manifest(r.cfg.data.partitions_dir)
    rows = []
    for c in manifest.client_ids[:3]:
        part = load_partition(r.cfg.data.partitions_dir, c)
        rows.append(part[part["split"] == "test"].head(3)[manifest.features].assign(client_id=c))
    rows.append(rows[0].head(2).assign(client_id="never-seen"))
    frame = pd.concat(rows, ignore_index=True)[["client_id", *manifest.features]]

    port = free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    sets = [a for o in r.overrides for a in ("--set", o)]
    server = subprocess.Popen(
        [str(bindir / "fedmtl"), "serve", "--port", str(port), *sets],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = json.dumps(
            {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        ).encode()
        answer = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as reply:
                    answer = json.loads(reply.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert answer is not None, (
            "the scoring server did not answer:\n"
            f"{server.stdout.read() if server.poll() is not None else ''}"
        )
        # a request without a feature column: HTTP 400 whose message starts with the reason, short
        lacking = frame.drop(columns=[manifest.features[1]])
        bad = json.dumps(
            {"dataframe_split": json.loads(lacking.to_json(orient="split", index=False))}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=bad,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        message = json.loads(refused.value.read())["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = pd.DataFrame(answer["predictions"])
    expected = PersonalizedPredictor(bundle).predict(frame)
    pd.testing.assert_frame_equal(
        served.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False
    )
    assert set(served.loc[frame["client_id"] == "never-seen", "head"]) == {"global"}
    assert set(served.loc[frame["client_id"] == manifest.client_ids[0], "head"]) == {"personal"}
    first = message.splitlines()[0]
    assert repr(manifest.features[1]) in first and "missing" in first and len(first) < 120, message
    assert "Failed to enforce schema" not in message and len(message) < 300, message


def test_promote_names_the_judged_versions_and_a_better_candidate(registry):
    """The reported case: a run of another method registered after a good one; a plain
    `fedmtl promote` judges the newest version, and says which, and what to judge instead."""
    from flows.training import federated_training

    r = registry
    other = federated_training(
        load_config(
            None, [*r.overrides, "training.rounds=1", "algorithm.method=fedavg"]
        ).model_dump(mode="json")
    )
    v3, run3 = other["model_version"], other["mlflow_run_id"]
    assert v3 == "3" and alias(r, "challenger") == v3
    key = (
        "personal/f1/mean"  # the gate metric (f1) of the heads that answer known clients (bundled)
    )
    # make the comparison certain: the fedavg run recorded a worse f1 than either earlier run
    r.client.log_metric(run3, key, 0.01, step=10_000)
    recorded = {
        v: r.client.get_run(run).data.metrics[key]
        for v, run in (("1", r.weak["mlflow_run_id"]), ("2", r.strong["mlflow_run_id"]))
    }
    best = max(recorded, key=lambda v: (recorded[v], int(v)))

    # no champion (as after the reported two runs): every other version is a candidate
    r.client.delete_registered_model_alias(MODEL, "champion")
    res = cli(r, "promote", "--dry-run")
    out = flat(res.output)
    assert f"judging version {v3} (MLflow run {run3}, method fedavg) (alias challenger)" in out, (
        res.output
    )
    assert "champion: none yet" in out
    assert f"version {best} (method fedmtl, run " in out and f"{key} {recorded[best]:.4f}" in out
    assert f"to judge version {best} instead: fedmtl promote --challenger {best}" in out
    assert out.index("fedmtl promote --challenger") < out.index("gate")

    # a champion trained with another method: said, with the version of the champion's method
    r.client.set_registered_model_alias(MODEL, "champion", "1")
    res = cli(r, "promote", "--dry-run")
    out = flat(res.output)
    assert f"champion: version 1 (MLflow run {r.weak['mlflow_run_id']}, method fedmtl)" in out, (
        res.output
    )
    assert (
        f"version {v3} was trained with method fedavg, the champion (version 1) with fedmtl" in out
    )
    assert (
        "fedmtl promote --challenger 2" in out
    )  # the only version registered since, other than v3
    assert alias(r) == "1" and "promotion.decision" not in tags(r, v3)  # a dry run
