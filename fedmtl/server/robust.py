"""Byzantine-robust aggregation rules: what the server does when some clients may send anything.

Plain FedAvg returns Σ w_i v_i / Σ w_i, so a single client can move the aggregate arbitrarily far
(its breakdown point is 0). The rules here bound what a minority of f faulty or malicious
("Byzantine") clients out of n can do, at the price of some statistical efficiency when all are
honest. Each works on n update vectors v_1 … v_n of the same length d:

- ``mean``: the weighted mean (FedAvg; no robustness, the reference).
- ``median``: the coordinate-wise median (Yin et al. 2018). For an even n it is the mean of the
  two middle values (``numpy.median``'s convention; ``torch.median`` returns the lower one).
  Breakdown point 1/2 per coordinate.
- ``trimmed_mean``: per coordinate, drop the k = ⌊β·n⌋ largest and the k smallest values and
  average the remaining n − 2k (Yin et al. 2018; ``scipy.stats.trim_mean``'s convention).
  Tolerates up to k Byzantine values per coordinate; needs β < 1/2.
- ``krum`` / ``multi_krum`` (Blanchard et al. 2017): the score of v_i is the sum of the squared
  distances to its n − f − 2 nearest other vectors; Krum returns the lowest-scoring vector,
  multi-Krum the mean of the m lowest-scoring ones (Krum is m = 1). Needs n > 2f + 2. Unlike the
  coordinate-wise rules it selects *whole* vectors, so it reports which clients it excluded.
- ``norm_bound`` (Sun et al. 2019): scale every vector to a norm of at most M,
  v_i ← v_i · min(1, M / ‖v_i‖), then take the weighted mean. It does not exclude anyone; it caps
  the damage: f of n equally weighted clients move the mean by at most (f/n)·(M + ‖honest mean‖).

Weights (sample counts) enter ``mean``, ``norm_bound`` and the final average of ``multi_krum``.
The coordinate-wise rules and Krum's selection ignore them: they are order statistics and
distances, and sample counts are self-reported, so weighting them would hand the breakdown
point back to whoever claims the most samples.

Defaults (:func:`robust_aggregate`): f = min(⌈0.2·n⌉, ⌊(n − 3)/2⌋), i.e. tolerate up to 20 %
of the clients (rounded up, so it covers :func:`fedmtl.server.byzantine.attackers` at 20 %),
capped at the largest f Krum allows; multi-Krum averages m = n − f vectors, the most it can keep
while still able to exclude all f; the norm bound M is the median of the n norms (an adaptive
choice that at least half the clients satisfy and that a Byzantine minority cannot inflate).

All rules are vectorised over the stacked [n, d] matrix, in float64, and the result is cast back
to the inputs' dtype. Memory is linear in n (a few copies of the [n, d] matrix for sorting),
except Krum's n × n distance matrix (``torch.cdist``). Inputs must be finite: a NaN or an
infinity is rejected with the index of the vector at fault, not silently propagated.

References:

- P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. *Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent.* NeurIPS 2017 (Krum, multi-Krum).
- D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. *Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates.* ICML 2018 (coordinate-wise median and trimmed mean).
- Z. Sun, P. Kairouz, A. T. Suresh, H. B. McMahan. *Can You Really Backdoor Federated Learning?*
  arXiv:1911.07963, 2019 (norm bounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmtl.state import ClientUpdate, GroupAggregate, Vector

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")
DEFAULT_BYZANTINE_FRACTION = 0.2


def _stack(vectors: Sequence[Vector]) -> torch.Tensor:
    """The [n, d] float64 matrix of the vectors, after checking they are 1-D, of one length,
    finite."""
    if len(vectors) == 0:
        raise ValueError("robust aggregation of no vectors")
    first = vectors[0]
    for i, v in enumerate(vectors):
        if v.dim() != 1:
            raise ValueError(f"vector {i} has shape {tuple(v.shape)}; expected a 1-D vector")
        if v.numel() != first.numel():
            raise ValueError(f"vector {i} has {v.numel()} values, vector 0 has {first.numel()}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"vector {i} is not finite (contains NaN or infinity)")
    return torch.stack([v.detach().to(torch.float64) for v in vectors])


def _weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    """Normalised float64 weights; ``None`` means uniform."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if len(weights) != n:
        raise ValueError(f"{n} vectors but {len(weights)} weights")
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(
            f"weights must be finite, non-negative, with a positive sum; got {list(weights)}"
        )
    return w / w.sum()


def _median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows; the mean of the two middle values for an even count."""
    s = x.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _trimmed(x: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise mean of the rows after dropping the ⌊β·n⌋ largest and smallest values."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = x.shape[0]
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:  # cannot happen for β < 1/2; a guard against rounding
        raise ValueError(f"trim_fraction {trim_fraction} drops all {n} values")
    return x.sort(dim=0).values[k : n - k].mean(dim=0)


def _check_byzantine(n: int, n_byzantine: int) -> None:
    if n_byzantine < 0:
        raise ValueError(f"n_byzantine must be >= 0, got {n_byzantine}")
    if n <= 2 * n_byzantine + 2:
        raise ValueError(
            f"Krum needs more than 2f + 2 = {2 * n_byzantine + 2} vectors for f = {n_byzantine} "
            f"Byzantine ones (Blanchard et al. 2017: n > 2f + 2), got n = {n}"
        )


def _krum_scores(x: torch.Tensor, n_byzantine: int) -> torch.Tensor:
    n = x.shape[0]
    _check_byzantine(n, n_byzantine)
    sq = torch.cdist(x, x).square()
    sq.fill_diagonal_(math.inf)  # a vector is not its own neighbour
    nearest = sq.sort(dim=1).values[:, : n - n_byzantine - 2]
    return nearest.sum(dim=1)


def _multi_krum(
    x: torch.Tensor, w: torch.Tensor, n_byzantine: int, m: int
) -> tuple[torch.Tensor, list[int]]:
    n = x.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum m must be in [1, n = {n}], got {m}")
    scores = _krum_scores(x, n_byzantine)
    chosen = torch.argsort(scores, stable=True)[:m].sort().values
    ws = w[chosen]
    ws = ws / ws.sum() if float(ws.sum()) > 0 else torch.full_like(ws, 1.0 / m)
    return ws @ x[chosen], chosen.tolist()


def _norm_bound(x: torch.Tensor, w: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    norms = x.norm(dim=1)
    bound = float(_median(norms[:, None])[0]) if max_norm is None else max_norm
    if bound < 0 or not math.isfinite(bound):
        raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm}")
    factor = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
    return w @ (x * factor[:, None])


def coordinate_median(vectors: Sequence[Vector]) -> Vector:
    """The coordinate-wise median (mean of the two middle values for an even count)."""
    return _median(_stack(vectors)).to(vectors[0].dtype)


def trimmed_mean(vectors: Sequence[Vector], trim_fraction: float) -> Vector:
    """Per coordinate, the mean after dropping the ⌊β·n⌋ largest and ⌊β·n⌋ smallest values."""
    return _trimmed(_stack(vectors), trim_fraction).to(vectors[0].dtype)


def krum_scores(vectors: Sequence[Vector], n_byzantine: int) -> torch.Tensor:
    """Krum's score per vector (float64): the sum of the squared Euclidean distances to its
    n − f − 2 nearest other vectors. Raises unless n > 2f + 2."""
    return _krum_scores(_stack(vectors), n_byzantine)


def multi_krum(
    vectors: Sequence[Vector], n_byzantine: int, m: int, weights: Sequence[float] | None = None
) -> tuple[Vector, list[int]]:
    """The (weighted) mean of the m lowest-scoring vectors and their indices (ascending); ties in
    the score go to the lower index. m = 1 is Krum."""
    x = _stack(vectors)
    agg, chosen = _multi_krum(x, _weights(weights, x.shape[0]), n_byzantine, m)
    return agg.to(vectors[0].dtype), chosen


def norm_bound(
    vectors: Sequence[Vector], weights: Sequence[float] | None = None, max_norm: float | None = None
) -> Vector:
    """Scale each vector to a Euclidean norm of at most ``max_norm`` (default: the median norm),
    then take the weighted mean."""
    x = _stack(vectors)
    return _norm_bound(x, _weights(weights, x.shape[0]), max_norm).to(vectors[0].dtype)


def default_byzantine(n: int) -> int:
    """f = min(⌈0.2·n⌉, ⌊(n − 3)/2⌋), at least 0: up to 20 % of the clients, as many as Krum
    allows."""
    # the epsilon keeps float error (0.2 * 15 = 3.0000000000000004) from rounding up a whole count
    return max(0, min(math.ceil(DEFAULT_BYZANTINE_FRACTION * n - 1e-9), (n - 3) // 2))


def robust_aggregate(
    vectors: Sequence[Vector],
    weights: Sequence[float] | None,
    rule: str,
    *,
    trim_fraction: float = 0.2,
    n_byzantine: int | None = None,
    max_norm: float | None = None,
) -> tuple[Vector, list[int]]:
    """The aggregate of ``vectors`` under ``rule`` (one of :data:`RULES`) and the indices of the
    inputs that contributed to it: the ones Krum/multi-Krum selected, all of them otherwise (the
    coordinate-wise rules drop different inputs in different coordinates; none is excluded whole).

    ``n_byzantine`` (Krum, multi-Krum): f, default :func:`default_byzantine`; multi-Krum keeps
    m = n − f. ``max_norm`` (norm_bound): default the median norm. ``weights`` None: uniform.
    """
    if rule not in RULES:
        raise ValueError(f"robust rule '{rule}' is not known; allowed values: {RULES}")
    x = _stack(vectors)
    n = x.shape[0]
    w = _weights(weights, n)
    everyone = list(range(n))
    if rule == "mean":
        agg = w @ x
    elif rule == "median":
        agg = _median(x)
    elif rule == "trimmed_mean":
        agg = _trimmed(x, trim_fraction)
    elif rule == "norm_bound":
        agg = _norm_bound(x, w, max_norm)
    else:
        f = default_byzantine(n) if n_byzantine is None else n_byzantine
        agg, everyone = _multi_krum(x, w, f, 1 if rule == "krum" else n - f)
    return agg.to(vectors[0].dtype), everyone


@dataclass(frozen=True)
class RobustSpec:
    """Which robust rule to aggregate with, and its settings (see :func:`robust_aggregate`)."""

    rule: str = "mean"
    trim_fraction: float = 0.2
    n_byzantine: int | None = None
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"robust rule '{self.rule}' is not known; allowed values: {RULES}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"robust trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.n_byzantine is not None and self.n_byzantine < 0:
            raise ValueError(f"robust n_byzantine must be >= 0 or unset, got {self.n_byzantine}")
        if self.max_norm is not None and not (self.max_norm >= 0 and math.isfinite(self.max_norm)):
            raise ValueError(
                f"robust max_norm must be a finite number >= 0 or unset, got {self.max_norm}"
            )

    @classmethod
    def from_config(cls, section: Any) -> "RobustSpec":
        """From a settings section with attributes of the same names (missing ones: defaults;
        a missing section: plain mean)."""
        if section is None:
            return cls()
        defaults = cls()
        return cls(
            **{
                name: getattr(section, name, getattr(defaults, name))
                for name in ("rule", "trim_fraction", "n_byzantine", "max_norm")
            }
        )


def aggregate_updates(updates: Sequence[ClientUpdate], spec: RobustSpec) -> GroupAggregate:
    """One group's aggregate under ``spec``: the rule runs on each client's concatenated update
    [Δθ, Δφ_t for the tasks in sorted order], so Krum keeps or excludes whole clients, and the
    result is split back into base and heads. Clients are taken in sorted order (as in
    :func:`fedmtl.server.aggregation.group_aggregate`), weighted by their sample counts (uniform if
    all are 0). ``clients``, ``n_clients`` and ``n_samples`` of the result count only the
    contributing clients; the excluded ones are those of ``updates`` not in ``clients``."""
    if not updates:
        raise ValueError("aggregate_updates of no client updates")
    members = sorted(updates, key=lambda u: u.client)
    group = members[0].group
    shares_base = members[0].delta_base is not None
    tasks = sorted(members[0].delta_heads)
    for u in members:
        if u.group != group:
            raise ValueError(
                f"client '{u.client}' is in group '{u.group}', not '{group}'; "
                "aggregate one group at a time"
            )
        if (u.delta_base is not None) != shares_base:
            raise ValueError(
                f"group '{group}': client '{u.client}' differs from '{members[0].client}' "
                "in releasing a base update"
            )
        if sorted(u.delta_heads) != tasks:
            raise ValueError(
                f"group '{group}': client '{u.client}' released heads {sorted(u.delta_heads)}, "
                f"client '{members[0].client}' {tasks}"
            )
    first = members[0]
    sizes = ([first.delta_base.numel()] if shares_base else []) + [
        first.delta_heads[t].numel() for t in tasks
    ]
    vectors = []
    for u in members:
        parts = ([u.delta_base] if shares_base else []) + [u.delta_heads[t] for t in tasks]
        if [p.numel() for p in parts] != sizes:
            raise ValueError(
                f"group '{group}': client '{u.client}' released parts of sizes "
                f"{[p.numel() for p in parts]}, client '{first.client}' {sizes}"
            )
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise ValueError(
                f"group '{group}': client '{u.client}' released a non-finite update "
                "(NaN or infinity)"
            )
        vectors.append(torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0))
    weights = [max(u.n_samples, 0) for u in members]
    if sum(weights) == 0:
        weights = [1] * len(members)
    try:
        agg, kept = robust_aggregate(
            vectors,
            weights,
            spec.rule,
            trim_fraction=spec.trim_fraction,
            n_byzantine=spec.n_byzantine,
            max_norm=spec.max_norm,
        )
    except ValueError as err:
        raise ValueError(f"group '{group}': {err}") from err
    pieces = list(torch.split(agg, sizes)) if sizes else []
    base = pieces.pop(0).clone() if shares_base else None
    contributing = [members[i] for i in kept]
    return GroupAggregate(
        group=group,
        n_clients=len(contributing),
        n_samples=sum(u.n_samples for u in contributing),
        delta_base=base,
        delta_heads={t: p.clone() for t, p in zip(tasks, pieces)},
        clients=[u.client for u in contributing],
    )
