"""Client-level privacy as a stage around the server's steps (``privacy.dp_fedavg``,
``privacy.secure_sum``): :class:`PrivateRelease` takes the place of the plain
:class:`fedmtl.server.aggregation.PlainRelease`, as Flower's DP strategy wrappers wrap a
strategy's ``aggregate_fit``. It chooses who takes part (under DP a Poisson sample from the run's
secret key: the sampling amplification ε counts on it), releases each group's sum privately
(:func:`fedmtl.privacy.aggregation.private_aggregate`: clipped, summed securely, noised) and,
after the merge, moves adaptive clipping's C (kept in :attr:`fedmtl.state.ServerState.privacy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedmtl.config.privacy import PrivacyConfig
from fedmtl.privacy.aggregation import RoundPrivacy, Summer, private_aggregate
from fedmtl.privacy.dp import AdaptiveClip
from fedmtl.privacy.randomness import SecretRandom, SecretStream
from fedmtl.server.dispatch import clients_for_round, sample_rate
from fedmtl.state import ClientUpdate, GroupAggregate, ServerState

#: Where adaptive clipping keeps C in :attr:`fedmtl.state.ServerState.privacy`.
CLIP_KEY = "privacy/clip"


@dataclass(frozen=True)
class PrivateRelease:
    """DP-FedAvg and/or a secure sum around dispatch, group aggregation and the merge."""

    config: PrivacyConfig
    secret: SecretRandom = field(repr=False, compare=False)
    seed: int = 0  # SecAgg+'s simulated dropout and graph (not a secret)
    #: some clients lack some tasks' labels (optional tasks): each head is weighted by the rows
    #: that hold its labels (:func:`fedmtl.privacy.release_vector.release_input`)
    partial: bool = False

    #: the server never sees one client's update alone (DP clips, the secure sum hides it), so
    #: the bounded-influence screen by norm does not apply: clipping bounds influence instead
    screens_norms = False

    def participants(self, clients: list[str], per_round: float, round_: int) -> list[str]:
        """Under DP a Poisson sample at the rate of ``per_round`` (who takes part is secret);
        else the same fixed-size sample as the plain release."""
        if self.config.dp:
            return poisson_sample(
                clients,
                sample_rate(per_round, len(clients)),
                self.secret.stream("round", round_, "participation"),
            )
        return clients_for_round(clients, per_round, self.seed, round_)

    def clip_norm(self, state: ServerState) -> float:
        """This round's C: ``dp_fedavg.clip_norm``, or where adaptive clipping took it."""
        kept = state.privacy.get(CLIP_KEY)
        adaptive = self.config.dp_fedavg.adaptive_clip
        return (
            float(kept.reshape(-1)[0])
            if kept is not None and adaptive
            else self.config.dp_fedavg.clip_norm
        )

    def aggregate(
        self,
        updates: list[ClientUpdate],
        state: ServerState,
        clients: list[str],
        per_round: float,
        release_group: Callable[[str], str],
        rows: Callable[[str], int],
        summer: Summer | None = None,
    ) -> tuple[dict[str, GroupAggregate], RoundPrivacy]:
        """The round's private releases. ``release_group``: the fixed, public group whose sum a
        client joins; ``rows``: a client's train rows as the manifest records them (public);
        ``summer``: where the sums are made when the coordinator holds no update (sites)."""
        rate = sample_rate(per_round, len(clients))
        expected: dict[str, float] = {}
        if self.config.dp:
            for client in clients:
                group = release_group(client)
                expected[group] = expected.get(group, 0.0) + rate
        scale = max((rows(c) for c in clients), default=1) or 1
        like = updates[0] if updates else None
        from fedmtl.client.training import client_seed

        return private_aggregate(
            updates,
            self.config,
            self.clip_norm(state),
            expected,
            float(scale),
            self.secret.stream("server", state.round, "dp-noise"),
            client_seed(self.seed, state.round, "server", "secagg"),
            like,
            summer,
            self.partial,
        )

    def after_merge(
        self, state: ServerState, merged: ServerState, report: RoundPrivacy | None
    ) -> None:
        """With adaptive clipping, move C towards the target quantile of this round's (noised)
        count of clients under it, in ``merged.privacy``."""
        dp = self.config.dp_fedavg
        if report is None or report.under_clip is None or not dp.adaptive_clip:
            return
        clip = AdaptiveClip(
            report.clip, report.expected_total or 1.0, dp.target_quantile, dp.clip_learning_rate
        )
        clip = clip.update_from_count(
            report.under_clip,
            report.released_clients,
            self.secret.stream("server", state.round, "dp-clip"),
        )
        merged.privacy[CLIP_KEY] = torch.tensor([clip.clip], dtype=torch.float64)


def poisson_sample(clients: Sequence[str], rate: float, stream: SecretStream) -> list[str]:
    """Each client independently with probability ``rate`` (Poisson sampling, what the DP
    accountant's sampled Gaussian mechanism assumes), input order. The draws come from a secret
    stream (:class:`fedmtl.privacy.randomness.SecretRandom`, the round's ``participation`` purpose):
    whoever knows the seed must not know who takes part."""
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate {rate} must be in (0, 1] (training.clients_per_round)")
    draws = stream.uniform(len(clients))
    return [c for c, d in zip(clients, draws) if d < rate]
