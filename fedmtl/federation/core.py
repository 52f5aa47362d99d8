"""The federation: one object holding what every step of a round needs (where the partitions
are, the model architecture, local training settings, the client stores, the method, the
privacy stages and the run's secret key). Its methods are the round's steps, in two parts
with a seam between them: :class:`fedmtl.federation.clients.ClientSteps` (what runs where a
client's data is) and :class:`fedmtl.federation.server.ServerSteps` (what the coordinator does
with what clients release). The round loop (:mod:`fedmtl.rounds`) calls them, in process or
through the Prefect tasks in ``tasks/``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmtl.algorithms import Algorithm, FedMTL
from fedmtl.client.data import ManifestKey
from fedmtl.client.store import ClientStore
from fedmtl.client.training import LocalConfig
from fedmtl.config import PrivacyConfig, dp_sgd_blocker
from fedmtl.data.manifest import Manifest, PartitionDigest
from fedmtl.faults import FaultSpec
from fedmtl.federation.clients import ClientSteps
from fedmtl.federation.server import ServerSteps
from fedmtl.nn import build_model
from fedmtl.privacy.randomness import SecretRandom
from fedmtl.privacy.release import PrivateRelease
from fedmtl.privacy.sample_level import SampleLevelDP
from fedmtl.server.aggregation import PlainRelease
from fedmtl.server.grouping import GroupingSpec
from fedmtl.server.optimizers import ServerOptimizer
from fedmtl.server.robust import RobustSpec
from fedmtl.state import ClientFailure, FailureKind


@dataclass(frozen=True)
class Federation(ClientSteps, ServerSteps):
    """A federation's settings, stores and privacy stages; the round's steps are its methods."""

    partitions_dir: Path
    manifest: Manifest
    model_cfg: Any  # fedmtl.config.ModelConfig
    local: LocalConfig
    store: ClientStore
    seed: int = 0
    groups: dict[str, str] = field(default_factory=dict)  # client -> group of the column
    algorithm: Algorithm = field(default_factory=FedMTL)
    grouping: GroupingSpec = field(default_factory=GroupingSpec)
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    weighting: str = "samples"
    batched: str = "auto"  # training.batched: auto | on | off
    clients_per_task: int | None = None  # training.clients_per_task (None: dispatch.shards' rule)
    #: the privacy mechanisms (frozen settings): the stages :attr:`release` and :attr:`sample_level`
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robust: RobustSpec = field(default_factory=RobustSpec)
    faults: FaultSpec = field(default_factory=FaultSpec)
    #: the run's secret key: every draw a privacy guarantee rests on (DP noise, Poisson sampling)
    secret: SecretRandom = field(default_factory=SecretRandom.fresh, repr=False, compare=False)
    max_norm_ratio: float | None = None  # server.max_norm_ratio: bounded influence (None: off)
    #: client -> the digest of its partition as validated
    #: (fedmtl.data.validation.bind_partitions): every read checks it (PartitionChanged), a
    #: client without one is refused. None: no check (a
    #: federation built without a validation report, e.g. tests and benchmarks)
    partition_digests: dict[str, PartitionDigest] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.privacy.sample_level:
            problem = dp_sgd_blocker(self.algorithm.name, self.grouping.method)
            if problem is not None:
                raise ValueError(problem)
        problem = self.missing_tasks_blocker()
        if problem is not None:
            raise ValueError(problem)

    def missing_tasks_blocker(self) -> str | None:
        """Why this federation cannot train clients that lack some tasks' labels (the manifest's
        optional tasks), or None. A head is averaged over the clients that hold its labels, with
        their counts as weights (the secure sum carries them beside the heads; under
        DP-FedAvg a client without a task's labels adds a zero head update); the robust rules
        compare whole updates (a client's unmoved head counts as a vote for no change); GPFL's,
        FedEM's and FedRoD's own losses do not skip missing labels, and a FedCP client would
        propose its untrained personal head as the global one."""
        optional = [t.name for t in self.manifest.tasks if t.optional]
        if not optional:
            return None
        why = None
        if self.algorithm.name in ("gpfl", "fedem", "fedrod", "fedcp"):
            why = f"algorithm.method '{self.algorithm.name}' does not support them"
        elif self.robust.rule != "mean":
            why = f"server.aggregator '{self.robust.rule}' compares whole updates"
        if why is None:
            return None
        return (
            f"some clients hold no labels of task(s) {optional} (optional in the manifest: "
            f"data.partition.missing_tasks or nulls in the label column), and {why}; use another "
            "setting or give every client every task's labels"
        )

    @functools.cached_property
    def release(self) -> PlainRelease | PrivateRelease:
        """The server's side of a round, dispatch to merge: plain, or, with DP-FedAvg or a secure
        sum, the private release wrapped around it."""
        if self.privacy.enabled:
            optional = any(t.optional for t in self.manifest.tasks)
            return PrivateRelease(self.privacy, self.secret, self.seed, partial=optional)
        return PlainRelease(self.robust, self.seed)

    @functools.cached_property
    def sample_level(self) -> SampleLevelDP | None:
        """DP-SGD around every client's training (``privacy.dp_sgd.enabled``), or None."""
        if not self.privacy.sample_level:
            return None
        return SampleLevelDP(self.privacy.dp_sgd, self.privacy.dp_sgd_delta, self.secret)

    @classmethod
    def from_config(
        cls,
        cfg,
        manifest: Manifest,
        store: ClientStore,
        secret: SecretRandom | None = None,
        *,
        partition_digests: dict[str, PartitionDigest] | None = None,
    ) -> "Federation":
        """``secret``: the run's key (the flow keeps it in the run's directory so that a resume
        draws the same noise); None: a fresh one. ``privacy.insecure_seeded_noise`` (tests
        only) replaces it with one derived from ``training.seed``."""
        from fedmtl.algorithms import get_algorithm

        if cfg.privacy.insecure_seeded_noise:
            secret = SecretRandom.insecure_from_seed(cfg.training.seed)

        return cls(
            partitions_dir=Path(cfg.data.partitions_dir),
            manifest=manifest,
            model_cfg=cfg.model,
            local=LocalConfig.from_config(cfg),
            store=store,
            seed=cfg.training.seed,
            groups={c.client: c.group for c in manifest.clients},
            algorithm=get_algorithm(cfg.algorithm.method),
            grouping=GroupingSpec.from_config(cfg.grouping),
            optimizer=ServerOptimizer.from_config(cfg.server),
            weighting=cfg.grouping.weighting,
            batched=cfg.training.batched,
            clients_per_task=cfg.training.clients_per_task,
            privacy=cfg.privacy,
            robust=RobustSpec(
                cfg.server.aggregator,
                cfg.server.trim_fraction,
                cfg.server.byzantine_clients,
                cfg.server.max_update_norm,
            ),
            faults=FaultSpec.from_config(cfg),
            secret=secret if secret is not None else SecretRandom.fresh(),
            max_norm_ratio=cfg.server.max_norm_ratio,
            partition_digests=partition_digests,
        )

    @property
    def grouping_method(self) -> str | None:
        """The grouping rule in force: None for methods without groups; IFCA always learns."""
        if not self.algorithm.uses_groups:
            return None
        return "ifca" if self.algorithm.learns_groups else self.grouping.method

    def new_model(self) -> torch.nn.Module:
        """The configured model, as the method shapes it (:meth:`Algorithm.build_model`)."""
        model = build_model(
            self.model_cfg,
            len(self.manifest.features),
            self.manifest.tasks,
            self.manifest.input_shape,
        )
        return self.algorithm.build_model(model, self.manifest.tasks)

    @functools.cached_property
    def _manifest_key(self) -> ManifestKey:
        return ManifestKey(self.manifest)


def participants(fed: Federation, clients: list[str], per_round: float, round_: int) -> list[str]:
    """This round's clients: a fixed-size sample, or, under DP, a Poisson sample at the same
    rate."""
    return fed.participants(clients, per_round, round_)


def sat_out_clients(failed: dict[str, ClientFailure]) -> list[str]:
    """The clients of a round's failures that sat out because their DP-SGD budget was spent."""
    return [c for c, f in failed.items() if f.kind is FailureKind.BUDGET_SPENT]
