"""The model registry under attack (MLflow only, no Prefect engine): a tiny federation trained
in memory and registered exactly as the training flow's ``finish`` does it.

1. Raw rows: no client's feature rows (train or test) appear in any artifact of the run or the
   model version, nor in any param, metric or tag; the registered bundle holds no personal head.
2. Stored code: a replaced ``serving.py`` (code that leaves a marker file when imported), a
   replaced ``bundle.pt``, a replaced ``MLmodel`` (pointing at new code), an added or a deleted
   file: every load path (``load_predictor``, ``champion_bundle``/warm start, promotion's scoring,
   rollback, ``fedmtl evaluate``, ``fedmtl serve``, ``fedmtl personalize``) refuses the version
   with an error naming it and the artifact, and the marker is never written; an untouched
   version loads and predicts as before; a version without recorded hashes is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import mlflow
from cli import app
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from models.personalized import CLIENT_COLUMN, PersonalizedPredictor
from tests.conftest import tiny_overrides

MODEL = "fedmtl-attack-test"
runner = CliRunner()
DECIMALS = 5  # rows compared as float tuples rounded to 1e-5


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from flows.registration import input_example, make_bundle
    from tasks.registry import log_personalized_model

    root = tmp_path_factory.mktemp("attacks")
    overrides = tiny_overrides(
        root, **{"training.rounds": 2, "model.hidden": "[16]", "tracking.registered_model": MODEL}
    )
    cfg = load_config(None, overrides)
    assert cfg.tracking.bundle_personal_heads is False  # the default under test
    prepare(cfg.data)
    manifest = partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    fed = Federation.from_config(cfg, manifest, ClientStore(root / "store"))
    state, _, _ = run_rounds(fed, manifest.client_ids, cfg.training.rounds)
    assert all(
        fed.store.load(c) is not None for c in manifest.client_ids
    )  # the clients do hold heads

    (root / "mlflow").mkdir()
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.create_experiment(
        "attacks", artifact_location=str(root / "mlflow/artifacts")
    )
    runs, bundles = [], []
    for _ in range(2):  # versions 1 and 2 (rollback needs a champion that replaced another)
        run_id = client.create_run(experiment).info.run_id
        client.log_batch(
            run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
        )
        bundle = make_bundle(fed, state, cfg)
        log_personalized_model(
            run_id, bundle, input_example(fed), MODEL, tags={"data_version": "test"}
        )
        client.set_terminated(run_id)
        runs.append(run_id)
        bundles.append(bundle)
    client.set_registered_model_alias(MODEL, "champion", "2")
    client.set_model_version_tag(MODEL, "2", "promotion.replaced_version", "1")

    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rows = {
        c: np.concatenate([fed.data(c).x_train.numpy(), fed.data(c).x_test.numpy()]).astype(
            np.float64
        )
        for c in manifest.client_ids
    }
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        fed=fed,
        manifest=manifest,
        client=client,
        runs=runs,
        bundle=bundles[0],
        tracking=cfg.tracking.tracking_uri,
        params=params,
        rows=rows,
    )


def store_dir(r, version: str) -> Path:
    """The version's artifact folder in the (local) artifact store: what an attacker rewrites."""
    return Path(r.client.get_model_version_download_uri(MODEL, version))


# --- 1. raw rows ---------------------------------------------------------------------------------


class RowFinder:
    """Every client feature row, searched as consecutive numbers in anything."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.d = next(iter(rows.values())).shape[1]
        self.keys = {tuple(np.round(row, DECIMALS)): c for c, x in rows.items() for row in x}
        self.raw = [
            (c, row.astype(np.float32).tobytes(), row.tobytes())
            for c, x in rows.items()
            for row in x
        ]
        self.found: list[str] = []

    def numbers(self, values, where: str) -> None:
        """Sliding windows of ``d`` consecutive numbers (rows of 2-D arrays are consecutive too)."""
        seq = np.asarray(values, dtype=np.float64).ravel()
        if seq.size < self.d:
            return
        windows = np.round(np.lib.stride_tricks.sliding_window_view(seq, self.d), DECIMALS)
        for i, w in enumerate(windows):
            client = self.keys.get(tuple(w))
            if client is not None:
                self.found.append(f"{where}: a feature row of client {client} at position {i}")

    def text(self, text: str, where: str) -> None:
        tokens = re.findall(
            r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])", text
        )
        self.numbers([float(t) for t in tokens], where)

    def tree(self, value, where: str) -> None:
        """Tensors, arrays and every list / dict of numbers inside a loaded object (JSON, torch)."""
        if isinstance(value, torch.Tensor):
            self.numbers(value.detach().double().numpy(), where)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            self.numbers(value, where)
        elif isinstance(value, dict):
            self.tree(list(value.values()), where)
            for k, v in value.items():
                self.tree(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            nums = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
            self.numbers(nums, where)
            for i, v in enumerate(value):
                if isinstance(v, (list, tuple, dict, torch.Tensor, np.ndarray)):
                    self.tree(v, f"{where}[{i}]")
        elif isinstance(value, str):
            self.text(value, where)

    def file(self, path: Path, where: str) -> None:
        data = path.read_bytes()
        for (
            client,
            f32,
            f64,
        ) in self.raw:  # a row stored raw (a binary dump, a tensor file's storage)
            if f32 in data or f64 in data:
                self.found.append(f"{where}: the raw bytes of a feature row of client {client}")
        if path.suffix == ".pt":
            self.tree(torch.load(path, weights_only=True), where)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return  # binary (plots): searched as raw bytes above
        self.text(text, where)
        if path.suffix == ".json" or path.name.endswith("input_example.json"):
            self.tree(json.loads(text), where)
        elif path.suffix in (".yaml", ".yml") or path.name == "MLmodel":
            self.tree(yaml.safe_load(text), where)


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_the_finder_finds_a_planted_row(registered):
    """The search below can fail: a row as the old input example held it, and inside a tensor."""
    r = registered
    client = r.manifest.client_ids[3]
    row = r.rows[client][-1]
    finder = RowFinder(r.rows)
    old_style = pd.DataFrame([row], columns=r.manifest.features).assign(client_id=client)
    finder.tree(json.loads(old_style.to_json(orient="split")), "split json")
    finder.text(old_style.to_csv(index=False), "csv")
    finder.tree(
        {
            "base": torch.cat(
                [torch.randn(7), torch.tensor(row, dtype=torch.float32), torch.randn(3)]
            )
        },
        "tensor",
    )
    finder.tree({"rows": torch.tensor(np.stack([row, row]))}, "2-D tensor")
    assert len(finder.found) >= 4, finder.found


def test_no_client_row_in_any_artifact_param_metric_or_tag(registered, tmp_path):
    r = registered
    finder = RowFinder(r.rows)
    for i, run_id in enumerate(r.runs):
        run = r.client.get_run(run_id)
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="", dst_path=str(tmp_path / f"run{i}")
            )
        )
        for path in all_files(local):
            finder.file(path, f"run artifact {path.relative_to(local)}")
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            for k, v in values.items():
                finder.text(str(v), f"run {kind} {k}")
        finder.numbers([run.data.metrics[k] for k in sorted(run.data.metrics)], "run metrics")
        for output in run.outputs.model_outputs:
            logged = r.client.get_logged_model(output.model_id)
            for kind, values in (("param", logged.params), ("tag", logged.tags)):
                for k, v in (values or {}).items():
                    finder.text(str(v), f"logged model {kind} {k}")
    seen = 0
    for version in ("1", "2"):
        mv = r.client.get_model_version(MODEL, version)
        for k, v in mv.tags.items():
            finder.text(str(v), f"version {version} tag {k}")
        finder.text(mv.description or "", f"version {version} description")
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=str(store_dir(r, version)), dst_path=str(tmp_path / f"v{version}")
            )
        )
        for path in all_files(local):
            finder.file(path, f"version {version} artifact {path.relative_to(local)}")
            seen += 1
    model = r.client.get_registered_model(MODEL)
    finder.text(json.dumps(model.tags) + (model.description or ""), "registered model")
    assert seen >= 2 * 8  # MLmodel, bundle.pt, serving.py, input examples, environment files
    assert finder.found == []


def test_input_example_is_synthetic_and_the_bundle_holds_no_personal_head(registered, tmp_path):
    r = registered
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=str(store_dir(r, "1")), dst_path=str(tmp_path)
        )
    )
    example = json.loads((local / "input_example.json").read_text())
    frame = pd.DataFrame(example["data"], columns=example["columns"])
    assert set(frame[CLIENT_COLUMN]) == {"example-client"}
    assert not set(frame[CLIENT_COLUMN]) & set(r.manifest.client_ids)
    assert (frame[r.manifest.features].to_numpy() == 0).all()
    serving = json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]
    assert {row[serving["columns"].index(CLIENT_COLUMN)] for row in serving["data"]} == {
        "example-client"
    }

    raw = torch.load(local / "artifacts/bundle.pt", weights_only=True)
    assert raw["personal_heads"] == {} and raw["personal_bases"] == {}
    assert raw["group_heads"] and raw["client_groups"]  # known clients are routed to their group


# --- 2. stored code ------------------------------------------------------------------------------

EVIL_SERVING = """
from pathlib import Path
Path({marker!r}).write_text("the replaced serving.py ran")
from mlflow.models import set_model
from models.pyfunc import PersonalizedModel
set_model(PersonalizedModel())
"""


def _serving(folder: Path, marker: Path) -> str:
    (folder / "serving.py").write_text(EVIL_SERVING.format(marker=str(marker)))
    return "serving.py"


def _bundle(folder: Path, marker: Path) -> str:
    path = folder / "artifacts/bundle.pt"
    raw = torch.load(path, weights_only=True)
    raw["base"] = torch.zeros_like(raw["base"])
    torch.save(raw, path)
    return "artifacts/bundle.pt"


def _mlmodel(folder: Path, marker: Path) -> str:
    (folder / "evil.py").write_text(EVIL_SERVING.format(marker=str(marker)))
    text = (folder / "MLmodel").read_text()
    code = re.search(
        r"model_code_path: (\S+)", text
    )  # the loader runs <model folder>/<its basename>
    assert code and code.group(1).endswith("serving.py")
    (folder / "MLmodel").write_text(text.replace(code.group(0), "model_code_path: evil.py"))
    return "MLmodel"


def _extra(folder: Path, marker: Path) -> str:
    (folder / "code").mkdir(exist_ok=True)
    (folder / "code/models.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return "code/models.py"


def _missing(folder: Path, marker: Path) -> str:
    (folder / "input_example.json").unlink()
    return "input_example.json"


TAMPERS = {
    "serving.py": _serving,
    "bundle.pt": _bundle,
    "MLmodel": _mlmodel,
    "extra file": _extra,
    "missing file": _missing,
}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path


@pytest.fixture(params=sorted(TAMPERS))
def tampered(request, registered, marker, tmp_path):
    """Version 1 (the version rolled back to) and 2 (the champion) with one artifact replaced in
    the store; restored afterwards."""
    r = registered
    backups = {}
    for version in ("1", "2"):
        folder = store_dir(r, version)
        backups[folder] = tmp_path / f"backup-v{version}"
        shutil.copytree(folder, backups[folder])
        artifact = TAMPERS[request.param](folder, marker)
    yield SimpleNamespace(artifact=artifact, kind=request.param)
    for folder, backup in backups.items():
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)


def _refusal(version: str, artifact: str) -> str:
    return (
        rf"version {version} .*of registered model '{MODEL}' failed its integrity check: "
        rf"artifact '{re.escape(artifact)}'"
    )


def test_every_load_path_refuses_a_tampered_version(registered, tampered, marker, monkeypatch):
    from flows.promote import rollback, score_model
    from tasks.promotion import Registry
    from tasks.registry import ModelIntegrityError, champion_bundle, load_predictor

    r = registered
    with pytest.raises(ModelIntegrityError, match=_refusal("1", tampered.artifact)):
        load_predictor(f"models:/{MODEL}/1", r.tracking)
    with pytest.raises(ModelIntegrityError, match=_refusal("2", tampered.artifact)):
        load_predictor(f"models:/{MODEL}@challenger", r.tracking)
    with pytest.raises(
        ModelIntegrityError, match=_refusal("2", tampered.artifact)
    ):  # the warm start's loader
        champion_bundle(MODEL, r.tracking)
    registry = Registry.open(r.tracking, MODEL)
    with pytest.raises(
        ModelIntegrityError, match=_refusal("1", tampered.artifact)
    ):  # promotion's scoring
        score_model.fn("1", registry, r.cfg.data.partitions_dir, r.manifest.client_ids)
    with pytest.raises(
        ModelIntegrityError, match=_refusal("1", tampered.artifact)
    ):  # restores version 1
        rollback.fn(r.cfg.model_dump(mode="json"), actor="test")
    assert str(r.client.get_model_version_by_alias(MODEL, "champion").version) == "2"  # unchanged

    res = runner.invoke(app, ["evaluate", "-p", str(r.params), "-m", "1"])
    assert res.exit_code == 2, res.output
    assert "failed its integrity check" in res.output and f"'{tampered.artifact}'" in res.output
    assert f"'{MODEL}'" in res.output and "version 1" in res.output

    served = []
    monkeypatch.setattr("os.execve", lambda *args: served.append(args))
    res = runner.invoke(app, ["serve", "-p", str(r.params), "-m", "champion"])
    assert res.exit_code == 2 and "failed its integrity check" in res.output and served == [], (
        res.output
    )

    support = r.root / "support.csv"
    pd.DataFrame(np.zeros((2, len(r.manifest.features))), columns=r.manifest.features).to_csv(
        support, index=False
    )
    res = runner.invoke(
        app,
        [
            "personalize",
            str(support),
            "--model",
            f"runs:/{r.runs[0]}/model",
            "--tracking-uri",
            r.tracking,
            "--out",
            str(r.root / "p.csv"),
        ],
    )
    assert res.exit_code == 2 and "failed its integrity check" in res.output, res.output

    assert not marker.exists()  # no replaced code ran on any of those paths

    if tampered.kind in (
        "serving.py",
        "MLmodel",
    ):  # the attack is real: MLflow's own loader runs it
        mlflow.pyfunc.load_model(str(store_dir(r, "1")))
        assert marker.exists()


def test_an_untouched_version_loads_serves_and_predicts_as_before(
    registered, monkeypatch, tmp_path
):
    from tasks.registry import HASH_TAG, artifact_hashes, champion_bundle, load_predictor

    r = registered
    loaded = load_predictor(f"models:/{MODEL}/1", r.tracking)
    known, unknown = r.manifest.client_ids[0], "never-seen"
    x = r.fed.data(known).x_test.numpy().astype("float64")
    frame = pd.DataFrame(x, columns=r.manifest.features)
    frame = pd.concat(
        [frame.assign(client_id=known), frame.head(2).assign(client_id=unknown)], ignore_index=True
    )
    served = loaded.predict(frame)
    pd.testing.assert_frame_equal(served, PersonalizedPredictor(r.bundle).predict(frame))
    heads = served.groupby(frame[CLIENT_COLUMN])["head"].unique().map(set).to_dict()
    assert heads == {known: {"group"}, unknown: {"global"}}  # personal heads stay on the clients

    version, bundle = champion_bundle(MODEL, r.tracking)
    assert version == "2" and torch.equal(bundle.base, r.bundle.base)

    recorded = json.loads(r.client.get_model_version(MODEL, "1").tags[HASH_TAG])
    assert {
        "MLmodel",
        "serving.py",
        "artifacts/bundle.pt",
        "input_example.json",
        "serving_input_example.json",
        "requirements.txt",
        "conda.yaml",
        "python_env.yaml",
    } <= set(recorded)
    assert recorded == artifact_hashes(store_dir(r, "1"))
    assert (
        r.client.get_run(r.runs[0]).data.tags[HASH_TAG]
        == r.client.get_model_version(MODEL, "1").tags[HASH_TAG]
    )

    res = runner.invoke(
        app, ["evaluate", "-p", str(r.params), "-m", "1", "-o", str(tmp_path / "s.csv")]
    )
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "s.csv")["head"]) == {"group"}

    served_args = []
    monkeypatch.setattr("os.execve", lambda *args: served_args.append(args))
    res = runner.invoke(app, ["serve", "-p", str(r.params), "-m", "champion"])
    assert res.exit_code == 0, res.output
    argv = served_args[0][1]
    local = Path(argv[argv.index("-m") + 1])  # serves the checked local copy, not the store
    assert local.is_dir() and not str(local).startswith(str(r.root))
    assert json.loads(r.client.get_model_version(MODEL, "2").tags[HASH_TAG]) == artifact_hashes(
        local
    )
    shutil.rmtree(local)


def test_a_version_without_recorded_hashes_is_refused(registered):
    from tasks.registry import HASH_TAG, ModelIntegrityError, load_predictor

    r = registered
    value = r.client.get_model_version(MODEL, "1").tags[HASH_TAG]
    r.client.delete_model_version_tag(MODEL, "1", HASH_TAG)
    try:
        with pytest.raises(
            ModelIntegrityError,
            match=rf"version 1 of registered model '{MODEL}' has no recorded "
            r"artifact hashes.*re-register it by training",
        ):
            load_predictor(f"models:/{MODEL}/1", r.tracking)
        res = runner.invoke(app, ["evaluate", "-p", str(r.params), "-m", "1"])
        assert res.exit_code == 2 and "has no recorded artifact hashes" in res.output, res.output
    finally:
        r.client.set_model_version_tag(MODEL, "1", HASH_TAG, value)
