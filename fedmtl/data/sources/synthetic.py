"""The ``synthetic`` source: FedProx's Synthetic(alpha, beta), one set per client, and the
extra label functions (tasks) of ``data.synthetic.n_tasks``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmtl.config import SyntheticConfig
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import RawData
from fedmtl.data.sources.common import client_ids


#: Largest number of rows one synthetic client gets (caps the heavy lognormal tail).
MAX_SYNTHETIC_CLIENT_ROWS = 20_000
#: Fewest rows one synthetic client gets (``size_scale`` may shrink the FedProx sizes).
MIN_SYNTHETIC_CLIENT_ROWS = 1


def synthetic_task_name(task: int) -> str:
    """The label column of synthetic task ``task``: ``label``, ``label_1``, ``label_2``, ..."""
    return "label" if task == 0 else f"label_{task}"


def synthetic_task_classes(task: int, n_classes: int) -> list[int]:
    """Task 1 is binary; every other task has ``n_classes`` classes."""
    return [0, 1] if task == 1 else list(range(n_classes))


def generate_synthetic(cfg: SyntheticConfig, seed: int) -> RawData:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020, ``generate_synthetic``).

    For client k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) (classes x features), b_k ~ N(u_k, 1);
    B_k ~ N(0, beta), v_k ~ N(B_k, 1) per feature; x ~ N(v_k, Sigma) with
    Sigma = diag(j^-1.2), j = 1..d; y = argmax(softmax(W_k x + b_k)). Sizes are
    ``int(lognormal(4, 2)) + 50`` times ``cfg.size_scale``, clipped to
    [:data:`MIN_SYNTHETIC_CLIENT_ROWS`, :data:`MAX_SYNTHETIC_CLIENT_ROWS`] (the lognormal tail
    would otherwise give a client millions of rows once in a while). Deterministic in ``seed``.

    ``cfg.n_tasks`` > 1 adds label functions of the same x, each with its own per-client
    weights drawn around the same u_k (so clients differ in the same way in every task):

    - task 1, column ``label_1``, binary (classes [0, 1]): y = 1 if w_k . (x - v_k) + c_k > 0,
      with w_k ~ N(u_k, 1) (features), c_k ~ N(u_k, 1): a random hyperplane through (near)
      the client's own data. It is centred on v_k because w_k . x alone is dominated by
      w_k . v_k, which would give most clients a single class; centred, both classes occur
      in nearly every client, each with its own balance (defaults, seeds 0..3: the minority
      class is 3-50 % of a client's rows, about a third at the median).
    - tasks 2 and 3, columns ``label_2``, ``label_3``: like task 0, y = argmax(W^t_k x + b^t_k)
      over ``n_classes`` classes, with fresh W^t_k ~ N(u_k, 1), b^t_k ~ N(u_k, 1).

    Task t's weights come from their own generator, ``default_rng([seed, t])``, so the data of
    task 0 (features, sizes, ``label``) is bit-identical whatever ``n_tasks`` is, and
    ``label_t`` does not depend on how many tasks follow it.
    """
    rng = np.random.default_rng(seed)
    k, d, c = cfg.n_clients, cfg.n_features, cfg.n_classes
    base_sizes = rng.lognormal(4.0, 2.0, k).astype(np.int64) + 50
    sizes = np.clip(
        (base_sizes * cfg.size_scale).astype(np.int64),
        MIN_SYNTHETIC_CLIENT_ROWS,
        MAX_SYNTHETIC_CLIENT_ROWS,
    )
    mean_w = rng.normal(0.0, cfg.alpha, k)  # u_k (mean of W_k and b_k)
    mean_v = rng.normal(0.0, cfg.beta, k)  # B_k
    v = rng.normal(mean_v[:, None], 1.0, (k, d))  # v_k, the mean of x
    sigma = np.arange(1, d + 1, dtype=np.float64) ** -1.2  # diagonal of Sigma
    extra = range(1, cfg.n_tasks)
    task_rngs = {t: np.random.default_rng([seed, t]) for t in extra}

    ids = client_ids(k)
    xs, ys = [], []
    extra_ys: dict[int, list[np.ndarray]] = {t: [] for t in extra}
    for i in range(k):
        w = rng.normal(mean_w[i], 1.0, (c, d))
        b = rng.normal(mean_w[i], 1.0, c)
        x = v[i] + rng.standard_normal((int(sizes[i]), d)) * np.sqrt(sigma)
        # softmax is monotone, so argmax(softmax(z)) == argmax(z)
        ys.append(np.argmax(x @ w.T + b, axis=1).astype(np.int64))
        xs.append(x.astype(np.float32))
        for t in extra:
            trng = task_rngs[t]
            if t == 1:
                w_t = trng.normal(mean_w[i], 1.0, d)
                c_t = trng.normal(mean_w[i], 1.0)
                extra_ys[t].append(((x - v[i]) @ w_t + c_t > 0).astype(np.int64))
            else:
                w_t = trng.normal(mean_w[i], 1.0, (c, d))
                b_t = trng.normal(mean_w[i], 1.0, c)
                extra_ys[t].append(np.argmax(x @ w_t.T + b_t, axis=1).astype(np.int64))

    features = [f"x{j}" for j in range(d)]
    frame = pd.DataFrame(np.concatenate(xs), columns=features)
    frame.insert(0, "client", pd.Series(np.repeat(ids, sizes), dtype=str))
    frame.insert(1, "group", "0")
    frame["label"] = np.concatenate(ys)
    for t in extra:
        frame[synthetic_task_name(t)] = np.concatenate(extra_ys[t])
    tasks = [
        TaskSpec(synthetic_task_name(t), "classification", synthetic_task_classes(t, c))
        for t in range(cfg.n_tasks)
    ]
    return RawData(
        frame=frame,
        features=features,
        tasks=tasks,
        feature_range=None,
        input_shape=None,
        has_clients=True,
        true_groups=False,
    )
