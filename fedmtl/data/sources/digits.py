"""The ``digits`` source: scikit-learn's bundled 8x8 handwritten digits, no clients yet."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import RawData


def load_digits() -> RawData:
    """scikit-learn's 1,797 8x8 digit images, pixels scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    data = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    features = [f"x{j}" for j in range(data.shape[1])]
    frame = pd.DataFrame(data, columns=features)
    frame["label"] = np.asarray(bunch.target, dtype=np.int64)
    return RawData(
        frame=frame,
        features=features,
        tasks=[TaskSpec("label", "classification", list(range(10)))],
        feature_range=(0.0, 1.0),
        input_shape=[1, 8, 8],
        has_clients=False,
        true_groups=False,
    )
