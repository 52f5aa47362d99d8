"""Private aggregation: the group_aggregate step when ``privacy`` is on.

What a client releases each round is one vector u_c: its base update Δθ followed by the head
update Δφ_g of its group (the parts its method shares). With privacy on, the server never
averages those vectors itself:

1. **Releases** (:func:`plan_releases`). Each group's sum is released on its own only when the
   group is big enough: ``min_group_size`` clients or more, counted from the public expected
   participation q·N_g under DP (so the plan does not depend on who was sampled) and from the
   actual participants otherwise. Smaller groups are pooled into one base-only release (their
   heads are not updated that round: a head sum over their members would be theirs alone);
   a pool that is itself too small sits the round out (its clients are named in the report).
2. **Clipping** (``dp``): each u_c is clipped to L2 norm C (:func:`fedmtl.privacy.dp.clip_update`)
   and counts once (uniform weights, DP-FedAvg). Without DP, u_c is weighted by its sample
   count over a public scale and its coordinates clipped to ±``secure_sum.range``.
3. **Summing**: plainly, or with SecAgg+ (:func:`fedmtl.privacy.secagg.secure_sum`) inside the
   release, so that the aggregator receives masked vectors and learns their sum only. Simulated
   ``secure_sum.dropout`` clients go silent after sending their masked input; their self-masks are
   rebuilt from their neighbours' Shamir shares and the sum is still exact. With
   ``secure_sum.protocol: ckks`` the release is summed with CKKS homomorphic encryption
   instead (:func:`fedmtl.privacy.he.encrypted_sum`): the aggregator receives ciphertexts only,
   adds them, and a key holder (one fresh key per round, separate from the aggregator) decrypts
   the sum — exact to about 1e-8 per client and coordinate. CKKS has one message per client, so
   there is no mid-protocol dropout to simulate (``secure_sum.dropout`` does not apply).
4. **Noise** (``dp``): central Gaussian noise N(0, (z_Δ·C)²) on each release's sum, added by
   the aggregator after unmasking, then division by the release's expected number of clients
   (public) — so the group and global updates are post-processing of noised sums, and each
   round is one sampled Gaussian mechanism per client for the accountant
   (:mod:`fedmtl.privacy.accounting`, ``releases_per_round=1``). The trust this needs: the
   aggregator adds the noise honestly; with secure aggregation it sees the exact sum before it does.
   (Distributed noise, each client adding its share before masking, would remove that trust
   at the price of noise that falls short when clients drop out; not implemented.)

The result is one :class:`~fedmtl.state.GroupAggregate` per release, with the public weight
``weight`` the global merge uses instead of sample counts under DP.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmtl.config.privacy import PrivacyConfig
from fedmtl.privacy import dp
from fedmtl.privacy.he import HEError, KeyHolder, encrypted_sum
from fedmtl.privacy.randomness import SecretStream
from fedmtl.privacy.release_vector import layout, per_task_mean, release_input, split
from fedmtl.privacy.secagg import SecAggError, secure_sum
from fedmtl.state import ClientUpdate, GroupAggregate, Vector

#: The name of the pooled base-only release of the groups too small for their own.
POOLED = "__pooled__"


@dataclass
class Release:
    """One released sum: its members' updates, its public expected size, whether it carries
    the group's head update (a pooled release does not)."""

    name: str
    updates: list[ClientUpdate]
    expected: float
    heads: bool = True


@dataclass
class RoundPrivacy:
    """What the round's private aggregation did (logged with the round; no client's values)."""

    clip: float
    noise_std: float = 0.0
    releases: list[str] = field(default_factory=list)
    pooled_groups: list[str] = field(default_factory=list)
    held_back: dict[str, str] = field(default_factory=dict)  # client -> why it released nothing
    dropped_mid_protocol: list[str] = field(default_factory=list)
    dropped_reasons: dict[str, str] = field(default_factory=dict)  # sites: who, and why
    secagg_seconds: float = 0.0
    under_clip: float | None = None  # Σ [‖u_c‖ ≤ C] over the released clients (adaptive clipping)
    released_clients: int = 0
    expected_total: float = 0.0  # Σ q·N_g: the public denominator of the adaptive-clip count

    def metrics(self, dp: bool) -> dict[str, float]:
        """The report as metrics (no client's own values). Under DP only what is public or
        covered by ε: the clip norm (adaptive clipping moves it by the noised count,
        post-processing), the noise std and the planned releases; the counts of released,
        held-back and dropped clients depend on who was sampled and are not released."""
        out = {
            "privacy/clip": self.clip,
            "privacy/noise_std": self.noise_std,
            "privacy/releases": float(len(self.releases)),
        }
        if not dp:
            out.update(
                {
                    "privacy/released_clients": float(self.released_clients),
                    "privacy/held_back": float(len(self.held_back)),
                    "privacy/dropped_mid_protocol": float(len(self.dropped_mid_protocol)),
                    "time/secagg_s": self.secagg_seconds,
                }
            )
        return out


def plan_releases(
    updates: Sequence[ClientUpdate], spec: PrivacyConfig, expected: Mapping[str, float]
) -> tuple[list[Release], dict[str, str], list[str]]:
    """(releases, held-back clients with the reason, the pooled groups). ``expected``: each
    group's public expected number of participants (q·N_g); under DP a group's size for the
    rule is that, otherwise its actual participants this round."""
    by_group: dict[str, list[ClientUpdate]] = defaultdict(list)
    for u in sorted(updates, key=lambda u: u.client):
        by_group[u.group].append(u)
    groups = sorted(set(by_group) | (set(expected) if spec.dp else set()))
    m = spec.min_group_size
    releases, small = [], []
    for g in groups:
        size = expected.get(g, 0.0) if spec.dp else len(by_group[g])
        if size >= m:
            releases.append(Release(g, by_group[g], expected.get(g, float(len(by_group[g])))))
        elif by_group[g] or spec.dp:
            small.append(g)
    held: dict[str, str] = {}
    pooled_groups: list[str] = []
    if small:
        members = [u for g in small for u in by_group[g]]
        pool_expected = sum(expected.get(g, 0.0) for g in small)
        size = pool_expected if spec.dp else len(members)
        shares_base = any(u.delta_base is not None for u in members) or (spec.dp and not members)
        if size >= m and shares_base:
            releases.append(
                Release(POOLED, members, pool_expected or float(len(members)), heads=False)
            )
            pooled_groups = small
        else:
            for u in members:
                held[u.client] = (
                    f"group '{u.group}' is smaller than privacy.min_group_size={m} "
                    f"and so is the pool of small groups ({size:g})"
                )
    return releases, held, pooled_groups


@dataclass(frozen=True)
class ReleaseSpec:
    """One release as its members must compute their input to the sum (public): its members,
    the vector's length, the head tasks it carries (none for a pooled release), this round's C
    and the public weight scale."""

    name: str
    members: list[str]
    dim: int
    tasks: list[str]
    clip: float
    weight_scale: float
    partial: bool = False  # optional tasks: per-task weights ride in the vector (release_input)


#: sums one release's inputs where they are: (Σ vectors, Σ scalars, the members left out of
#: the sum, seconds)
Summer = Callable[[ReleaseSpec], tuple[Vector, float, list[str], float]]


def private_aggregate(
    updates: Sequence[ClientUpdate],
    spec: PrivacyConfig,
    clip: float,
    expected: Mapping[str, float],
    weight_scale: float,
    generator: torch.Generator | SecretStream,
    seed: int,
    like: ClientUpdate | None = None,
    summer: Summer | None = None,
    partial: bool = False,
) -> tuple[dict[str, GroupAggregate], RoundPrivacy]:
    """The round's group aggregates under ``spec`` (see the module docstring). ``clip``: this
    round's C (adaptive clipping changes it); ``weight_scale``: the public sample-count scale
    of the weights without DP (the largest client's train rows); ``like``: an update with the
    release's layout, for DP releases of groups with no participant this round (pure noise);
    ``summer``: sums a release where its members are (sites: SecAgg+ across their processes,
    :mod:`fedmtl.sites.secure`), the updates then standing for their members' layout only;
    ``partial``: some clients lack some tasks' labels (:func:`release_input`)."""
    report = RoundPrivacy(clip=clip, expected_total=sum(expected.values()))
    releases, held, pooled = plan_releases(updates, spec, expected)
    report.held_back, report.pooled_groups = held, pooled
    z = spec.dp_fedavg.noise_multiplier
    if spec.dp and spec.dp_fedavg.adaptive_clip:
        z = dp.update_noise_multiplier(z, dp.default_count_noise(report.expected_total or 1.0))
    report.noise_std = z * clip if spec.dp else 0.0
    out: dict[str, GroupAggregate] = {}
    under = 0.0
    keys: list[KeyHolder] = []  # CKKS: the round's key holder, made when first needed
    for i, release in enumerate(releases):
        members = release.updates
        if spec.secure and 0 < len(members) < max(2, spec.min_group_size):
            # DP plans releases by expected size; a round that sampled too few members for a
            # secure sum keeps them out (under DP the release is then pure noise)
            for u in members:
                held[u.client] = (
                    f"release '{release.name}' sampled {len(members)} client(s) this round, "
                    f"fewer than a secure sum needs (privacy.min_group_size={spec.min_group_size})"
                )
            template, members = members[:1], []
            if not spec.dp:
                continue
        else:
            template = members[:1]
        template = template or ([like] if like is not None else [])
        if not template:
            continue
        base, sizes, tasks = layout(template, release.heads)
        weighted = partial and not spec.dp and bool(tasks)  # per-task weights in the vector
        dim = max(base, 0) + sum(sizes.values()) + (len(tasks) if weighted else 0)
        try:
            if (
                summer is not None and members
            ):  # the members hold their vectors: summed where they are
                total, weight_sum, dropped, seconds = summer(
                    ReleaseSpec(
                        release.name,
                        [u.client for u in members],
                        dim,
                        tasks,
                        clip,
                        weight_scale,
                        partial,
                    )
                )
                members = [u for u in members if u.client not in set(dropped)]  # not in the sum
            else:
                vectors, scalars = {}, {}
                for u in members:
                    vectors[u.client], scalars[u.client] = release_input(
                        u, spec, clip, weight_scale, tasks, partial
                    )
                total, weight_sum, dropped, seconds = _sum(
                    vectors, scalars, spec, clip, dim, seed * 1_000_003 + i, keys
                )
        except (
            SecAggError,
            HEError,
        ) as exc:  # e.g. too many dropped out: the release's clients count for nothing
            for u in members:
                held[u.client] = f"secure aggregation of release '{release.name}' failed: {exc}"
            if not spec.dp:
                continue
            members = []
            total, weight_sum, dropped, seconds = torch.zeros(dim), 0.0, [], 0.0
        report.dropped_mid_protocol += dropped
        report.secagg_seconds += seconds
        report.released_clients += len(members)
        if spec.dp:
            under += weight_sum  # Σ bits, summed like the updates (securely when that is on)
            noise = dp.gaussian_noise(total.shape, z * clip, generator)
            mean = (total.to(torch.float64) + noise.to(torch.float64)) / release.expected
            weight = release.expected
        elif weighted:
            mean, task_weights = per_task_mean(
                total.to(torch.float64),
                weight_sum,
                base,
                sizes,
                tasks,
                spec.secure_sum.range,
                weight_scale,
            )
            weight = None
        else:
            mean = (
                total.to(torch.float64) / weight_sum
                if weight_sum > 0
                else total.to(torch.float64) * 0
            )
            weight = None
        delta_base, heads = split(mean.to(torch.float32), base, sizes, tasks)
        n_samples = (
            int(round(weight_sum * weight_scale)) if not spec.dp else int(round(release.expected))
        )
        out[release.name] = GroupAggregate(
            group=release.name,
            n_clients=len(members),
            n_samples=max(n_samples, 1),
            delta_base=delta_base,
            delta_heads=heads,
            clients=[u.client for u in members],
            weight=weight,
            pooled=not release.heads,
            task_samples=(
                {t: int(round(float(w) * weight_scale)) for t, w in zip(tasks, task_weights)}
                if weighted
                else None
            ),
        )
    report.releases = sorted(out)
    report.under_clip = under if spec.dp else None
    return out, report


def _sum(
    vectors: dict[str, Vector],
    scalars: dict[str, float],
    spec: PrivacyConfig,
    clip: float,
    dim: int,
    seed: int,
    keys: list[KeyHolder] | None = None,
) -> tuple[Vector, float, list[str], float]:
    """Σ vectors (and Σ scalars): SecAgg+ or CKKS when on, else plainly. Returns (sum, scalar
    sum, clients that dropped mid-protocol, seconds spent in the protocol). ``keys``: CKKS's key
    holder for the round (appended when empty, reused by the round's later releases)."""
    if not vectors:
        return torch.zeros(dim), 0.0, [], 0.0
    if not spec.secure:
        return torch.stack(list(vectors.values())).sum(0), float(sum(scalars.values())), [], 0.0
    if spec.secure_sum.protocol == "ckks":
        keys = [] if keys is None else keys
        keygen = time.perf_counter()
        if not keys:
            keys.append(KeyHolder())
        keygen = time.perf_counter() - keygen
        result = encrypted_sum(
            {u: v.numpy() for u, v in vectors.items()},
            bound=clip if spec.dp else spec.secure_sum.range,
            scalars=scalars,
            scalar_bound=1.0,  # weights n_c / weight_scale ≤ 1, or DP's 0/1 bits
            key_holder=keys[0],
        )
        return (
            torch.from_numpy(np.asarray(result.sum, dtype=np.float64)).to(torch.float32),
            float(result.scalar_sum or 0.0),
            [],
            keygen + float(result.seconds["total"]),
        )
    ids = sorted(vectors)
    rng = np.random.default_rng(seed)
    n_drop = int(math.floor(spec.secure_sum.dropout * len(ids)))
    dropped = sorted(rng.choice(ids, size=n_drop, replace=False).tolist()) if n_drop else []
    bound = clip if spec.dp else spec.secure_sum.range
    result = secure_sum(
        {u: vectors[u].numpy() for u in ids},
        clip=bound,
        neighbours=spec.secure_sum.neighbours,
        max_dropout=spec.secure_sum.max_dropout,
        drop_after_masking=dropped,
        scalars=scalars,
        # the scalars are weights n_c / weight_scale ≤ 1, or DP's 0/1 under-clip bits
        scalar_clip=1.0,
    )
    return (
        torch.from_numpy(np.asarray(result.sum, dtype=np.float64)).to(torch.float32),
        float(result.scalar_sum or 0.0),
        dropped,
        float(result.seconds["total"]),
    )
