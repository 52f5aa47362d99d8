"""The data pipeline: sources, partition schemes, train/test splits and partition files."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedmtl.config import DataConfig, SyntheticConfig, TableConfig
from fedmtl.data import (
    MANIFEST,
    generate_synthetic,
    load_digits,
    load_partition,
    load_prepared,
    load_table,
    partition,
    partition_file_name,
    prepare,
    read_manifest,
    train_test_rows,
)
from fedmtl.data import partitioners as P
from fedmtl.data.manifest import TaskSpec

# --------------------------------------------------------------------------------------------
# helpers


def make_cfg(tmp_path: Path, **data: Any) -> DataConfig:
    partition_cfg = data.pop("partition", {})
    return DataConfig.model_validate(
        {
            "raw_dir": str(tmp_path / "raw"),
            "partitions_dir": str(tmp_path / "parts"),
            "partition": partition_cfg,
            **data,
        }
    )


def all_partitions(cfg: DataConfig) -> pd.DataFrame:
    manifest = read_manifest(cfg.partitions_dir)
    return pd.concat([load_partition(cfg.partitions_dir, c) for c in manifest.client_ids])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return load_digits().frame["label"].to_numpy()


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


# --------------------------------------------------------------------------------------------
# partitioners


def test_iid_uses_every_row_once_in_even_sizes(digit_labels: np.ndarray) -> None:
    parts = P.iid(digit_labels, 7, np.random.default_rng(0))
    assert len(parts) == 7
    assert_exact_cover(parts, len(digit_labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_per_seed(digit_labels: np.ndarray) -> None:
    a = P.iid(digit_labels, 5, np.random.default_rng(3))
    b = P.iid(digit_labels, 5, np.random.default_rng(3))
    c = P.iid(digit_labels, 5, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_shards_use_every_row_once_and_give_few_classes(digit_labels: np.ndarray) -> None:
    parts = P.shards(digit_labels, 20, np.random.default_rng(0), shards_per_client=2)
    assert_exact_cover(parts, len(digit_labels))
    n_classes = [len(np.unique(digit_labels[p])) for p in parts]
    # a shard may straddle two classes, so at most 2 per shard; typically exactly 2 in all
    assert max(n_classes) <= 4
    assert np.median(n_classes) == 2


def test_shards_aligned_with_classes_give_at_most_shards_per_client_classes() -> None:
    labels = np.repeat(np.arange(10), 40)  # 20 shards of 20 rows never straddle a class
    for seed in range(5):
        parts = P.shards(labels, 10, np.random.default_rng(seed), shards_per_client=2)
        assert_exact_cover(parts, len(labels))
        assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks(digit_labels: np.ndarray) -> None:
    n = len(digit_labels)
    skewed = P.dirichlet(digit_labels, 10, np.random.default_rng(0), alpha=0.1)
    even = P.dirichlet(digit_labels, 10, np.random.default_rng(0), alpha=100.0)
    for parts in (skewed, even):
        assert_exact_cover(parts, n)
        assert min(len(p) for p in parts) >= 10
    h_skewed = np.mean([entropy(digit_labels[p]) for p in skewed])
    h_even = np.mean([entropy(digit_labels[p]) for p in even])
    assert h_even > 0.95 * math.log(10)
    assert h_skewed < 0.6 * h_even


def test_dirichlet_refuses_an_impossible_min_size(digit_labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="at least 10"):
        P.dirichlet(digit_labels[:50], 10, np.random.default_rng(0), alpha=0.5)


def test_label_permutation_groups_and_permutations(digit_labels: np.ndarray) -> None:
    split = P.label_permutation(digit_labels, 10, np.random.default_rng(0), 4, 10)
    assert split.groups == [i % 4 for i in range(10)]
    assert_exact_cover(split.indices, len(digit_labels))
    perms = [tuple(p) for p in split.transforms]
    np.testing.assert_array_equal(perms[0], np.arange(10))
    assert len(set(perms)) == 4  # distinct, so none after the first is the identity
    assert all(sorted(p) == list(range(10)) for p in perms)


def test_rotate_images_is_rot90_of_the_image() -> None:
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    turned = P.rotate_images(x, 1, [1, 8, 8])
    np.testing.assert_array_equal(turned[1].reshape(8, 8), np.rot90(x[1].reshape(8, 8)))
    np.testing.assert_array_equal(P.rotate_images(x, 4, [1, 8, 8]), x)
    with pytest.raises(ValueError, match="input_shape"):
        P.rotate_images(x, 1, [1, 4, 4])


# --------------------------------------------------------------------------------------------
# sources


def test_digits_source() -> None:
    raw = load_digits()
    assert raw.frame.shape == (1797, 65)
    assert raw.features == [f"x{j}" for j in range(64)]
    assert (raw.frame[raw.features].dtypes == np.float32).all()
    assert raw.frame[raw.features].to_numpy().min() >= 0
    assert raw.frame[raw.features].to_numpy().max() <= 1
    assert raw.frame["label"].dtype == np.int64
    assert raw.tasks == [TaskSpec("label", "classification", list(range(10)))]
    assert raw.input_shape == [1, 8, 8] and raw.feature_range == (0.0, 1.0)
    assert not raw.has_clients


def test_synthetic_is_deterministic_and_well_formed() -> None:
    cfg = SyntheticConfig(n_clients=12)
    a, b, c = generate_synthetic(cfg, 1), generate_synthetic(cfg, 1), generate_synthetic(cfg, 2)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert not a.frame[a.features].equals(c.frame[c.features])
    sizes = a.frame.groupby("client").size()
    assert list(sizes.index) == [f"c{i:03d}" for i in range(12)]
    assert sizes.min() >= 50
    assert len(a.features) == 60 and (a.frame[a.features].dtypes == np.float32).all()
    assert a.frame["label"].dtype == np.int64
    assert a.frame["label"].between(0, 9).all()
    assert set(a.frame["group"]) == {"0"}
    assert a.has_clients and a.feature_range is None


def test_synthetic_size_scale_and_cap() -> None:
    small = generate_synthetic(SyntheticConfig(n_clients=8, size_scale=0.1), 0)
    full = generate_synthetic(SyntheticConfig(n_clients=8), 0)
    assert len(small.frame) < len(full.frame)
    huge = generate_synthetic(SyntheticConfig(n_clients=2, n_features=2, size_scale=1e6), 0)
    assert huge.frame.groupby("client").size().max() <= 20_000


def write_table(tmp_path: Path, suffix: str = ".csv", **columns: Any) -> Path:
    frame = pd.DataFrame(
        columns
        or {
            "user": ["a", "a", "a", "b", "b", "b", "b", "c", "c", "c"],
            "f1": np.linspace(0, 1, 10),
            "f2": np.arange(10),
            "note": ["x"] * 10,
            "y": [0, 1, 0, 1, 0, 1, 1, 0, 1, 0],
            "z": np.linspace(-1, 1, 10),
        }
    )
    path = tmp_path / f"table{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trip(tmp_path: Path, suffix: str) -> None:
    path = write_table(tmp_path, suffix)
    before = sha(path)
    table = {
        "path": str(path),
        "client_column": "user",
        "label_columns": ["y", "z"],
        "task_kinds": {"z": "regression"},
    }
    cfg = make_cfg(tmp_path, source="table", table=table, test_fraction=0.34)
    prepare(cfg)
    manifest = partition(cfg)
    assert sha(path) == before
    assert manifest.scheme == "natural" and manifest.source == "table"
    assert manifest.client_ids == ["a", "b", "c"]
    assert manifest.features == ["f1", "f2"]  # "note" is not numeric
    assert manifest.tasks == [
        TaskSpec("y", "classification", [0, 1]),
        TaskSpec("z", "regression", []),
    ]
    assert not manifest.true_groups
    frame = all_partitions(cfg)
    assert list(frame.columns) == ["client", "group", "split", "row", "f1", "f2", "y", "z"]
    assert (frame[["f1", "f2"]].dtypes == np.float32).all()
    assert frame["row"].dtype == np.int64
    assert set(frame["group"]) == {"0"}
    original = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    frame = frame.sort_values("row")
    np.testing.assert_array_equal(frame["row"], np.arange(10))
    np.testing.assert_array_equal(frame["client"], original["user"])
    np.testing.assert_allclose(frame["f1"], original["f1"], rtol=1e-6)
    np.testing.assert_array_equal(frame["y"], original["y"])


def test_table_group_column(tmp_path: Path) -> None:
    path = write_table(
        tmp_path,
        user=[1, 1, 2, 2, 3, 3],
        cohort=["x", "x", "y", "y", "x", "x"],
        f=np.arange(6.0),
        label=["no", "yes", "no", "yes", "no", "yes"],
    )
    raw = load_table(TableConfig(path=str(path), client_column="user", group_column="cohort"))
    assert raw.true_groups and raw.features == ["f"]
    assert list(raw.frame["client"]) == ["1", "1", "2", "2", "3", "3"]
    assert list(raw.frame["group"]) == ["x", "x", "y", "y", "x", "x"]
    assert raw.tasks == [TaskSpec("label", "classification", ["no", "yes"])]


@pytest.mark.parametrize(
    ("settings", "column"),
    [
        ({"client_column": "nobody"}, "nobody"),
        ({"label_columns": ["target"]}, "target"),
        ({"group_column": "cohort"}, "cohort"),
        ({"feature_columns": ["f1", "f9"]}, "f9"),
        ({"feature_columns": ["note"]}, "note"),
        ({"feature_columns": []}, "feature"),
    ],
)
def test_table_errors_name_column_and_file(
    tmp_path: Path, settings: dict[str, Any], column: str
) -> None:
    path = write_table(tmp_path)
    cfg = TableConfig(
        path=str(path), **{"client_column": "user", "label_columns": ["y"], **settings}
    )
    with pytest.raises(ValueError) as info:
        load_table(cfg)
    assert column in str(info.value) and str(path) in str(info.value)


def test_table_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    with pytest.raises(ValueError, match="does not exist"):
        load_table(TableConfig(path=str(missing)))
    other = tmp_path / "table.xlsx"
    other.write_text("x")
    with pytest.raises(ValueError, match="xlsx"):
        load_table(TableConfig(path=str(other)))
    path = write_table(tmp_path, user=["a", "b"], f=[1.0, 2.0], label=[1, None])
    with pytest.raises(ValueError, match="label column 'label'.*missing values"):
        load_table(TableConfig(path=str(path), client_column="user"))
    path = write_table(tmp_path, user=["a", "b"], label=[1, 0])
    with pytest.raises(ValueError, match="no numeric feature columns"):
        load_table(TableConfig(path=str(path), client_column="user"))


# --------------------------------------------------------------------------------------------
# partitions


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits prepared once, copied into each test that partitions them."""
    root = tmp_path_factory.mktemp("digits")
    prepare(make_cfg(root))
    return root / "raw"


def prepared_digits(tmp_path: Path, digits_raw: Path, **data: Any) -> DataConfig:
    cfg = make_cfg(tmp_path, **data)
    Path(cfg.raw_dir).mkdir(parents=True)
    for path in digits_raw.iterdir():
        (Path(cfg.raw_dir) / path.name).write_bytes(path.read_bytes())
    return cfg


def test_prepare_writes_raw_and_schema(digits_raw: Path) -> None:
    raw, source = load_prepared(digits_raw)
    assert source == "digits"
    assert raw.frame.shape == (1797, 65) and raw.input_shape == [1, 8, 8]
    assert raw.feature_range == (0.0, 1.0)
    assert not list(digits_raw.glob(".*"))  # no temporary files left


def test_partition_needs_prepared_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedmtl data prepare"):
        partition(make_cfg(tmp_path))


def test_partition_contract_and_raw_unchanged(tmp_path: Path, digits_raw: Path) -> None:
    cfg = prepared_digits(tmp_path, digits_raw, partition={"scheme": "iid", "n_clients": 6})
    hashes = {p.name: sha(p) for p in Path(cfg.raw_dir).iterdir()}
    manifest = partition(cfg)
    assert {p.name: sha(p) for p in Path(cfg.raw_dir).iterdir()} == hashes
    assert manifest.client_ids == [f"c{i:03d}" for i in range(6)]
    assert manifest.scheme == "iid" and manifest.source == "digits" and not manifest.true_groups
    files = sorted(p.name for p in Path(cfg.partitions_dir).iterdir())
    assert files == sorted([MANIFEST] + [e.file for e in manifest.clients])
    frame = all_partitions(cfg)
    assert list(frame.columns) == ["client", "group", "split", "row", *manifest.features, "label"]
    assert (frame[manifest.features].dtypes == np.float32).all()
    np.testing.assert_array_equal(np.sort(frame["row"]), np.arange(1797))
    for entry in manifest.clients:
        rows = frame[frame["client"] == entry.client]
        assert (rows["split"] == "train").sum() == entry.n_train
        assert (rows["split"] == "test").sum() == entry.n_test


def test_train_test_split_is_stratified_deterministic_and_disjoint(
    tmp_path: Path, digits_raw: Path
) -> None:
    cfg = prepared_digits(
        tmp_path, digits_raw, test_fraction=0.2, partition={"scheme": "iid", "n_clients": 4}
    )
    partition(cfg)
    first = all_partitions(cfg)
    partition(cfg)
    pd.testing.assert_frame_equal(first, all_partitions(cfg))
    for _, rows in first.groupby("client"):
        test = rows[rows["split"] == "test"]
        assert len(test) == math.ceil(0.2 * len(rows))  # sklearn rounds the test share up
        assert rows["row"].is_unique  # train and test are disjoint
        per_class = rows["label"].value_counts()
        held_out = test["label"].value_counts().reindex(per_class.index, fill_value=0)
        assert ((held_out - 0.2 * per_class).abs() <= 1).all()  # each class in proportion
    other = make_cfg(
        tmp_path / "other", test_fraction=0.2, seed=1, partition={"scheme": "iid", "n_clients": 4}
    )
    other = other.model_copy(update={"raw_dir": cfg.raw_dir})
    partition(other)
    assert not first["row"].equals(all_partitions(other)["row"])


def test_train_test_rows_small_clients() -> None:
    task = TaskSpec("y", "classification", [0, 1, 2])
    one = pd.DataFrame({"y": [0]})
    assert not train_test_rows(one, task, 0.25, 0).any()
    singletons = pd.DataFrame({"y": [0, 1, 2, 2]})  # classes 0 and 1 have one row: unstratified
    assert train_test_rows(singletons, task, 0.25, 0).sum() == 1
    too_many_classes = pd.DataFrame({"y": [0, 0, 1, 1, 2, 2]})  # 2 test rows < 3 classes
    assert train_test_rows(too_many_classes, task, 0.25, 0).sum() == 2


def test_repartition_leaves_no_stale_files(tmp_path: Path, digits_raw: Path) -> None:
    cfg = prepared_digits(tmp_path, digits_raw, partition={"scheme": "iid", "n_clients": 8})
    partition(cfg)
    keep = Path(cfg.partitions_dir) / "notes.txt"
    keep.write_text("mine")
    fewer = cfg.model_copy(update={"partition": cfg.partition.model_copy(update={"n_clients": 3})})
    manifest = partition(fewer)
    names = sorted(p.name for p in Path(cfg.partitions_dir).iterdir())
    assert names == sorted([MANIFEST, "notes.txt"] + [e.file for e in manifest.clients])
    assert len(manifest.clients) == 3 and keep.read_text() == "mine"


def test_label_permutation_partition(tmp_path: Path, digits_raw: Path) -> None:
    cfg = prepared_digits(
        tmp_path,
        digits_raw,
        partition={"scheme": "label-permutation", "n_clients": 8, "n_groups": 4},
    )
    manifest = partition(cfg)
    assert manifest.true_groups and manifest.scheme == "label-permutation"
    assert [e.group for e in manifest.clients] == [str(i % 4) for i in range(8)]
    raw = load_digits().frame["label"].to_numpy()
    frame = all_partitions(cfg)
    mappings = []
    for group, rows in frame.groupby("group"):
        pairs = pd.DataFrame({"old": raw[rows["row"]], "new": rows["label"].to_numpy()})
        mapping = pairs.groupby("old")["new"].unique()
        assert (mapping.map(len) == 1).all()  # the same class always becomes the same label
        mapping = mapping.map(lambda v: int(v[0]))
        assert sorted(mapping) == list(range(10))  # a permutation of the classes
        is_identity = bool((mapping.index == mapping.to_numpy()).all())
        assert is_identity == (group == "0")
        mappings.append(tuple(mapping))
    assert len(set(mappings)) == 4


def test_rotation_partition(tmp_path: Path, digits_raw: Path) -> None:
    cfg = prepared_digits(
        tmp_path, digits_raw, partition={"scheme": "rotation", "n_clients": 4, "n_groups": 4}
    )
    manifest = partition(cfg)
    assert manifest.true_groups and manifest.input_shape == [1, 8, 8]
    raw = load_digits()
    x = raw.frame[raw.features].to_numpy()
    frame = all_partitions(cfg)
    for group, rows in frame.groupby("group"):
        k = int(group)
        got = rows[manifest.features].to_numpy()
        want = np.rot90(x[rows["row"]].reshape(-1, 1, 8, 8), k=k, axes=(-2, -1)).reshape(-1, 64)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(rows["label"], raw.frame["label"].to_numpy()[rows["row"]])


def test_skewed_schemes_end_to_end(tmp_path: Path, digits_raw: Path) -> None:
    for scheme in ("dirichlet", "shards"):
        cfg = prepared_digits(
            tmp_path / scheme, digits_raw, partition={"scheme": scheme, "n_clients": 10}
        )
        manifest = partition(cfg)
        assert manifest.scheme == scheme and len(manifest.clients) == 10
        assert sum(e.n_train + e.n_test for e in manifest.clients) == 1797


def test_synthetic_end_to_end_keeps_its_clients(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        source="synthetic",
        synthetic={"n_clients": 5, "size_scale": 0.5},
        partition={"scheme": "shards", "n_clients": 99},
    )
    prepare(cfg)
    manifest = partition(cfg)
    assert manifest.scheme == "natural" and manifest.client_ids == [f"c{i:03d}" for i in range(5)]
    assert manifest.feature_range is None and len(manifest.features) == 60


def test_load_partition_errors(tmp_path: Path, digits_raw: Path) -> None:
    cfg = prepared_digits(tmp_path, digits_raw, partition={"scheme": "iid", "n_clients": 2})
    manifest = partition(cfg)
    with pytest.raises(ValueError, match="'c999'"):
        load_partition(cfg.partitions_dir, "c999")
    path = Path(cfg.partitions_dir) / manifest.entry("c001").file
    path.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"'c001'.*c001\.parquet"):
        load_partition(cfg.partitions_dir, "c001")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"'c001'.*c001\.parquet"):
        load_partition(cfg.partitions_dir, "c001")


def test_partition_file_names_are_safe_and_distinct() -> None:
    assert partition_file_name("c001") == "c001.parquet"
    odd = [partition_file_name(c) for c in ("a/b", "a_b", "../x", "a b", "")]
    assert len(set(odd)) == len(odd)
    assert all("/" not in n and not n.startswith(".") for n in odd)
