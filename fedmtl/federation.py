"""One federation: the clients' side of a round, as plain functions over explicit state.

:class:`Federation` bundles what every client step needs (where the partitions are, the
model architecture, local training settings, the client stores); the round loop
(:mod:`fedmtl.rounds`) calls its methods, in process or through the Prefect tasks in
``tasks/``, which are thin wrappers over them.

:meth:`Federation.train_clients` trains a shard of clients: with a batchable method (the
standard shared step) and ``training.batched`` allowing it, all of them at once
(:mod:`fedmtl.client.batched`), else one :meth:`Federation.client_round` after the other; either way
each client's update, metrics and personal state are those of :meth:`Federation.client_round`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmtl.server.aggregation import global_merge, group_aggregate
from fedmtl.algorithms import ALL, Algorithm, ClientContext, FedMTL
from fedmtl.client.batched import BatchingUnsupported, SharedJob, batching_blocker, train_shared
from fedmtl.client.data import ClientData, ManifestKey, PartitionChanged, PartitionError, load_client_data
from fedmtl.data.manifest import Manifest, PartitionDigest
from fedmtl.server.dispatch import clients_for_round, poisson_sample, sample_rate
from fedmtl.eval.metrics import VARIANTS, evaluate_clients
from fedmtl.server.grouping import WARMUP_GROUP, GroupingSpec, choose_group, regroup
from fedmtl.privacy.dp import AdaptiveClip
from fedmtl.privacy.dpsgd import EPSILON_KEY, LEDGER, DPSGDBudgetSpent, DPSGDSession, DPSGDSpec, Ledger, client_epsilons
from fedmtl.faults import FaultSpec
from fedmtl.nn import build_model
from fedmtl.privacy.aggregation import PrivacySpec, RoundPrivacy, private_aggregate
from fedmtl.server.robust import RobustSpec
from fedmtl.privacy.evaluation import StatLayout, pooled_evaluation, statistics_score
from fedmtl.privacy.randomness import SecretRandom
from fedmtl.server.optimizers import ServerOptimizer
from fedmtl.state import (ClientFailure, ClientUpdate, FailureKind, GroupAggregate, ServerState, flat,
                          initial_state)
from fedmtl.client.store import ClientStore
from fedmtl.client.training import LocalConfig, client_seed


class RejectedUpdate(ValueError):
    """A client update that must never reach a model (non-finite or wrong shape)."""

    failure_kind = "rejected"  # it would be rejected again: not retried


@dataclass(frozen=True)
class Federation:
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
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    robust: RobustSpec = field(default_factory=RobustSpec)
    faults: FaultSpec = field(default_factory=FaultSpec)
    dp_sgd: DPSGDSpec | None = None  # privacy.dp_sgd: sample-level DP-SGD in local training
    #: the run's secret key: every draw a privacy guarantee rests on (DP noise, Poisson sampling)
    secret: SecretRandom = field(default_factory=SecretRandom.fresh, repr=False, compare=False)
    max_norm_ratio: float | None = None  # server.max_norm_ratio: bounded influence (None: off)
    #: client -> the digest of its partition as validated (fedmtl.data.validation.bind_partitions): every
    #: read checks it (PartitionChanged), a client without one is refused. None: no check (a
    #: federation built without a validation report, e.g. tests and benchmarks)
    partition_digests: dict[str, PartitionDigest] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dp_sgd is not None:
            from fedmtl.config import dp_sgd_blocker

            problem = dp_sgd_blocker(self.algorithm.name, self.grouping.method)
            if problem is not None:
                raise ValueError(problem)

    @classmethod
    def from_config(cls, cfg, manifest: Manifest, store: ClientStore,
                    secret: SecretRandom | None = None, *,
                    partition_digests: dict[str, PartitionDigest] | None = None) -> "Federation":
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
            privacy=PrivacySpec.from_config(cfg.privacy),
            robust=RobustSpec(cfg.server.aggregator, cfg.server.trim_fraction, cfg.server.byzantine_clients,
                              cfg.server.max_update_norm),
            faults=FaultSpec.from_config(cfg),
            dp_sgd=DPSGDSpec.from_config(cfg.privacy),
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
        return build_model(
            self.model_cfg, len(self.manifest.features), self.manifest.tasks, self.manifest.input_shape
        )

    def initial_state(self) -> ServerState:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self.new_model()
            method = self.grouping_method
            if method is None:
                return initial_state(model, [], {c: ALL for c in self.groups})
            if method == "column":
                return initial_state(model, sorted(set(self.groups.values())) or ["0"], self.groups)
            if method == "cluster":
                return initial_state(model, [WARMUP_GROUP])
            # ifca: k heads, each its own random initialisation, so that losses differ
            names = [str(i) for i in range(self.grouping.n_groups)]
            heads = [{t: _fresh_head(h) for t, h in model.heads.items()} for _ in names]
            return initial_state(model, names, distinct_heads=heads)

    @functools.cached_property
    def _manifest_key(self) -> ManifestKey:
        return ManifestKey(self.manifest)

    def data(self, client: str) -> ClientData:
        """The client's partition, cached while its file is unchanged; with ``partition_digests``,
        only the very file validation passed. Raises a :class:`fedmtl.client.data.PartitionError`
        naming the client and the file when it cannot be used."""
        expected = None
        if self.partition_digests is not None:
            expected = self.partition_digests.get(client)
            if expected is None:
                raise PartitionChanged(f"client '{client}': its partition did not pass validation (no "
                                       "validated SHA-256 of it): it sits out", client)
        return load_client_data(self.partitions_dir, self._manifest_key, client, expected)

    def _generator(self, client: str, round_: int, purpose: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(client_seed(self.seed, round_, client, purpose))

    def context(self, client: str, round_: int, purpose: str = "") -> ClientContext:
        generator = self._generator(client, round_, purpose)
        return ClientContext(self.new_model(), list(self.manifest.tasks), self.local, generator, round_)

    def group_of(self, client: str, state: ServerState, data: ClientData, ctx: ClientContext) -> str:
        """The group ``client`` trains and is evaluated in, under the grouping in force."""
        method = self.grouping_method
        if method is None:
            return ALL
        if method == "column":
            return state.assignment.get(client) or self.groups.get(client) or data.group
        if method == "cluster":
            if set(state.group_heads) == {WARMUP_GROUP}:
                return WARMUP_GROUP
            known = state.assignment.get(client)
            if known in state.group_heads:
                return known
        return choose_group(ctx.model, state, data, ctx.tasks)

    @functools.cached_property
    def byzantine(self) -> frozenset[str]:
        """The clients made Byzantine by ``faults.byzantine_fraction`` (none by default)."""
        return self.faults.byzantine(self.manifest.client_ids)

    def train_data(self, client: str) -> ClientData:
        """The client's partition as it trains on it (a label-flipping attacker's labels flipped)."""
        return self.faults.poison_data(self.data(client), self.manifest.tasks, self.byzantine)

    def client_round(self, client: str, state: ServerState, attempt: int = 0) -> ClientUpdate:
        """Local training on ``client``: keeps its personal state, returns what it releases.
        Under ``privacy.dp_sgd`` every SGD step of the round is DP-SGD; the client adds the
        round's steps to its ledger and reports its ε with the update (``dp_sgd_epsilon``), or,
        when the round would take it above ``privacy.dp_sgd_target_epsilon``, sits the round out
        (:class:`DPSGDBudgetSpent`; nothing of it is kept or released)."""
        self.faults.before_training(client, state.round + 1, attempt)
        ledger = self._ledger_before(client, state) if self.dp_sgd is not None else None
        data = self.train_data(client)
        ctx = self.context(client, state.round)
        group = self.group_of(client, state, data, ctx)
        session = None
        if ledger is not None:  # DP-SGD's noise and batch sampling: from the secret key, per client and round
            session = DPSGDSession(self.dp_sgd, noise=self.secret.stream("client", client, state.round, "dp-sgd"))
            ctx.cfg = dataclasses.replace(ctx.cfg, dp_sgd=session)
        update, personal = self.algorithm.client_round(ctx, state, data, group,
                                                       self.store.load(client, at_most=state.round))
        update = self.faults.poison_update(update, state.round + 1, self.byzantine)
        check_update(update, state)
        if session is not None:
            ledger = ledger.plus(state.round + 1, session.steps)
            eps = self.dp_sgd.epsilon(ledger.history)
            self._check_budget(client, eps, "this round")
            self.store.save_record(client, LEDGER, ledger.to_tensor(), state.round + 1)
            update.metrics["dp_sgd_epsilon"] = eps
        if personal is not None:
            self.store.save(client, personal, state.round + 1)
        return update

    def _ledger_before(self, client: str, state: ServerState) -> Ledger:
        """The client's DP-SGD ledger as of ``state.round``; raises :class:`DPSGDBudgetSpent`
        when repeating its last round's steps would exceed the target."""
        ledger = Ledger.from_tensor(self.store.load_record(client, LEDGER, at_most=state.round))
        if self.dp_sgd.target_epsilon is not None and ledger.rows:
            self._check_budget(client, self.dp_sgd.epsilon(ledger.history + ledger.last_round()), "one more round")
        return ledger

    def _check_budget(self, client: str, eps: float, when: str) -> None:
        target = self.dp_sgd.target_epsilon
        if target is not None and not eps <= target:
            raise DPSGDBudgetSpent(
                f"client '{client}': {when} would take its sample-level ε to {eps:.4g} > "
                f"privacy.dp_sgd_target_epsilon={target:g} at δ={self.dp_sgd.delta:g}; it sits the round out")

    def batching_blocker(self, model: torch.nn.Module | None = None) -> str | None:
        """Why this federation's clients cannot be trained in a batch, or None if they can."""
        if self.dp_sgd is not None:
            return ("privacy.dp_sgd is on: DP-SGD clips each row's gradient (Opacus per-sample gradients), "
                    "which the batched step (torch.func over clients) does not compute")
        if not self.algorithm.batchable:
            return (f"algorithm.method '{self.algorithm.name}' has its own client procedure, not the "
                    "standard shared step (batchable methods: fedmtl, fedavg, fedavg-ft, FedProx via prox_mu)")
        return batching_blocker(model if model is not None else self.new_model())

    def train_rows(self) -> dict[str, int]:
        """Each client's training rows, from the manifest (what balances a round's shards)."""
        return {c.client: c.n_train for c in self.manifest.clients}

    def uses_batching(self, model: torch.nn.Module | None = None) -> bool:
        """Whether :meth:`train_clients` trains in batches; ``batched: on`` with a method or
        model that does not allow it raises :class:`BatchingUnsupported` naming the reason."""
        if self.batched not in ("auto", "on", "off"):
            raise ValueError(f"training.batched = {self.batched!r} is not allowed; allowed values: auto, on, off")
        if self.batched == "off":
            return False
        reason = self.batching_blocker(model)
        if reason is not None and self.batched == "on":
            raise BatchingUnsupported(f"training.batched is 'on' but {reason}; use training.batched=auto or off")
        return reason is None

    def train_clients(
        self, clients: list[str], state: ServerState, failed: dict[str, ClientFailure] | None = None, attempt: int = 0,
    ) -> list[ClientUpdate]:
        """Local training of a shard of clients, in order: batched when the method and model
        allow it and ``training.batched`` is not off, else :meth:`client_round` per client.

        ``failed`` None: a client that fails (missing data, rejected update) raises, as
        :meth:`client_round` does. A dict: the client is left out of the result and its error
        recorded there (client -> :class:`~fedmtl.state.ClientFailure`), so one bad client does not fail its shard.
        ``attempt``: 0 the first time, then the retry's number (fault injection draws anew)."""
        model = self.new_model()
        if not self.uses_batching(model):
            updates = []
            for client in clients:
                try:
                    updates.append(self.client_round(client, state, attempt))
                except Exception as exc:  # noqa: BLE001 - reported per client when asked to
                    if failed is None:
                        raise
                    failed[client] = ClientFailure.of(exc)
            return updates

        tasks = list(self.manifest.tasks)
        prepared = []  # (client, data, group, personal, start, generator)
        for client in clients:
            try:
                self.faults.before_training(client, state.round + 1, attempt)
                data = self.train_data(client)
                ctx = ClientContext(model, tasks, self.local, self._generator(client, state.round), state.round)
                group = self.group_of(client, state, data, ctx)
                personal = self.store.load(client, at_most=state.round)
                start = self.algorithm.shared_start(self.local, state, group, personal)
            except Exception as exc:  # noqa: BLE001
                if failed is None:
                    raise
                failed[client] = ClientFailure.of(exc)
                continue
            prepared.append((client, data, group, personal, start, ctx.generator))
        jobs = [SharedJob(data, start.base, start.heads, gen, start.prox_mu)
                for _, data, _, _, start, gen in prepared]
        trained = train_shared(model, tasks, self.local, jobs)
        updates = []
        for (client, data, group, personal, start, _), (base, heads, loss) in zip(prepared, trained):
            update, keep = self.algorithm.shared_result(data, group, state, start, base, heads, loss, personal)
            update = self.faults.poison_update(update, state.round + 1, self.byzantine)
            try:
                check_update(update, state)
            except RejectedUpdate as exc:
                if failed is None:
                    raise
                failed[client] = ClientFailure.of(exc)
                continue
            if keep is not None:
                self.store.save(client, keep, state.round + 1)
            updates.append(update)
        return updates

    def evaluate_clients(self, clients: list[str], state: ServerState,
                         skipped: dict[str, ClientFailure] | None = None) -> list[dict]:
        """Each client scores the global, group and personalised models on its own held-out
        split (records in client order). Personalisation runs per client (it may fit a
        personal head and keep it in the client's store); the scoring is batched over the
        clients (:func:`fedmtl.eval.metrics.evaluate_clients`), with one model for them all.

        ``skipped`` None: a client whose partition cannot be used raises its
        :class:`fedmtl.client.data.PartitionError`. A dict: that client is left out of the records and
        its failure recorded there (client -> :class:`~fedmtl.state.ClientFailure`), so one bad client does not stop the round."""
        model, jobs, groups = self._evaluation_jobs(clients, state, skipped)
        records = evaluate_clients(model, jobs, self.manifest.tasks)
        for r in records:
            r["assigned_group"] = groups[r["client"]]
        return records

    def evaluate_pooled(self, clients: list[str], state: ServerState,
                        skipped: dict[str, ClientFailure] | None = None) -> dict[str, float]:
        """Private evaluation (``privacy.client_metrics`` off): the same scoring, but each client
        reduces its scores to sufficient statistics (confusion counts, error sums) and only their
        sum over the clients comes out, through SecAgg+ (or CKKS, ``secure_aggregation_protocol``) when
        ``privacy.secure_aggregation`` is on,
        with ``privacy.evaluation_noise`` added to every summed count
        (:mod:`fedmtl.privacy.evaluation`): metrics ``{variant}/{metric}/pooled``. ``skipped``: as
        for :meth:`evaluate_clients` (a skipped client adds nothing to the sums)."""
        model, jobs, _ = self._evaluation_jobs(clients, state, skipped)
        tasks = list(self.manifest.tasks)
        records = evaluate_clients(model, jobs, tasks, score=statistics_score)
        spec = self.privacy
        return pooled_evaluation(
            StatLayout.build(VARIANTS, tasks), records, secure=spec.secure_aggregation,
            max_rows=max((c.n_test for c in self.manifest.clients), default=1),
            min_clients=spec.min_group_size, noise_std=spec.evaluation_noise,
            noise_multiplier=spec.evaluation_noise_multiplier if spec.dp else None,
            generator=self.secret.stream("server", state.round, "evaluation-noise"),
            neighbours=spec.secagg_neighbours, max_dropout=spec.secagg_max_dropout,
            protocol=spec.secure_aggregation_protocol)

    def _evaluation_jobs(self, clients: list[str], state: ServerState, skipped: dict[str, ClientFailure] | None = None):
        """The model, each client's (data, {variant: (base, heads)}) and each client's group.
        A client whose partition cannot be used (:class:`fedmtl.client.data.PartitionError`) raises,
        or, with ``skipped`` a dict, is left out and recorded there."""
        model = self.new_model()
        tasks = list(self.manifest.tasks)
        jobs, groups = [], {}
        for client in clients:
            try:
                data = self.data(client)
            except PartitionError as exc:
                if skipped is None:
                    raise
                skipped[client] = ClientFailure.of(exc)
                continue
            ctx = ClientContext(model, tasks, self.local, self._generator(client, state.round, "evaluate"),
                                state.round)
            group = self.group_of(client, state, data, ctx)
            base, heads, keep = self.algorithm.personalized(ctx, state, data, group,
                                                            self.store.load(client, at_most=state.round))
            if keep is not None:
                self.store.save(client, keep, state.round)
            jobs.append((data, {"global": (state.base, state.global_heads),
                                "group": (state.base, state.heads_for(group)), "personal": (base, heads)}))
            groups[client] = group
        return model, jobs, groups

    def aggregate(
        self, updates: list[ClientUpdate], state: ServerState, clients: list[str], per_round: float = 1.0
    ) -> tuple[dict[str, GroupAggregate], RoundPrivacy | None]:
        """The group_aggregate step: plain per-group means, or, with ``privacy`` on, the
        private releases of :mod:`fedmtl.privacy.aggregation` and their report."""
        if not self.privacy.enabled:
            return group_aggregate(updates, self.robust), None
        spec = self.privacy
        rate = sample_rate(per_round, len(clients))
        expected: dict[str, float] = {}
        if spec.dp:
            for client in clients:
                group = self.release_group(client, state)
                expected[group] = expected.get(group, 0.0) + rate
        scale = max((self.manifest_rows(c) for c in clients), default=1) or 1
        like = updates[0] if updates else None
        return private_aggregate(updates, spec, self.clip_norm(state), expected, float(scale),
                                 self.secret.stream("server", state.round, "dp-noise"),
                                 client_seed(self.seed, state.round, "server", "secagg"), like)

    def screen(self, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict[str, ClientFailure]]:
        """Bounded influence, before any aggregation: each update's weight is its client's train
        rows *as the manifest records them* (never the count a client reports), and, with
        ``server.max_norm_ratio`` and no privacy mechanism (under DP every update is clipped to
        C; under secure aggregation the server never sees one, and each coordinate is clipped to
        ±``privacy.secagg_range``), an update whose L2 norm exceeds that multiple of the round's
        lower median norm is refused. Returns (kept updates, refused client -> reason)."""
        for u in updates:
            u.n_samples = self.manifest_rows(u.client)
        ratio = self.max_norm_ratio
        if ratio is None or self.privacy.enabled or not updates:
            return list(updates), {}
        norms = {u.client: update_norm(u) for u in updates}
        ordered = sorted(norms.values())
        median = ordered[(len(ordered) - 1) // 2]  # the lower median: a minority cannot inflate it
        bound = ratio * median
        kept, refused = [], {}
        for u in updates:
            if norms[u.client] > bound:
                refused[u.client] = ClientFailure.of(RejectedUpdate(
                    f"client '{u.client}': update norm {norms[u.client]:.4g} exceeds "
                    f"server.max_norm_ratio={ratio:g} × the round's median update norm {median:.4g}"))
            else:
                kept.append(u)
        return kept, refused

    def release_group(self, client: str, state: ServerState) -> str:
        """The group whose sum ``client`` joins (fixed and public, as DP requires)."""
        if self.grouping_method is None:
            return ALL
        return state.assignment.get(client) or self.groups.get(client) or "0"

    @functools.cached_property
    def _train_rows(self) -> dict[str, int]:
        return {c.client: c.n_train for c in self.manifest.clients}

    def manifest_rows(self, client: str) -> int:
        """The client's train rows as the manifest records them (public sizes: the scale of
        the weights in a secure sum)."""
        return self._train_rows.get(client, 0)

    def clip_norm(self, state: ServerState) -> float:
        """This round's clip norm C: ``privacy.clip_norm``, or where adaptive clipping took it."""
        kept = state.optimizer.get(CLIP_KEY)
        return float(kept.reshape(-1)[0]) if kept is not None and self.privacy.adaptive_clip else self.privacy.clip_norm

    def needs_updates_to_merge(self, state: ServerState) -> bool:
        """Whether :meth:`merge` needs the round's client updates, not only the group aggregates:
        to learn groups, to record DP-SGD's ε, or to step the base by a robust rule over clients."""
        return self.regroup_due(state) or self.dp_sgd is not None or self.robust.rule != "mean"

    def merge(
        self, state: ServerState, groups: dict[str, GroupAggregate], updates: list[ClientUpdate] | None = None,
        privacy: RoundPrivacy | None = None,
    ) -> ServerState:
        """The server step: merge the group aggregates; at the end of the warm-up of
        ``grouping: cluster``, split the clients into learned groups; with adaptive clipping,
        move C towards the target quantile of this round's (noised) count of clients under it."""
        robust_base = updates if self.robust.rule != "mean" else None  # the base outvoted over clients
        merged = global_merge(state, groups, self.weighting, self.optimizer, self.algorithm.head_scope, self.robust,
                              robust_base)
        if privacy is not None and privacy.under_clip is not None and self.privacy.adaptive_clip:
            clip = AdaptiveClip(privacy.clip, privacy.expected_total or 1.0, self.privacy.target_quantile,
                                self.privacy.clip_learning_rate)
            clip = clip.update_from_count(privacy.under_clip, privacy.released_clients,
                                          self.secret.stream("server", state.round, "dp-clip"))
            merged.optimizer[CLIP_KEY] = torch.tensor([clip.clip], dtype=torch.float64)
        if self.regroup_due(state) and updates:
            merged, _ = regroup(state, merged, updates, self.grouping)
        if self.dp_sgd is not None and updates:
            merged.optimizer[EPSILON_KEY] = self.record_epsilons(state, updates)
        return merged

    def record_epsilons(self, state: ServerState, updates: list[ClientUpdate]) -> torch.Tensor:
        """The server's table of every client's latest sample-level ε (manifest order, NaN for a
        client that has not trained), with this round's reports written in."""
        ids = self.manifest.client_ids
        table = state.optimizer.get(EPSILON_KEY)
        table = (table.clone() if table is not None and table.numel() == len(ids)
                 else torch.full((len(ids),), math.nan, dtype=torch.float64))
        index = self._client_index
        for u in updates:
            eps = u.metrics.get("dp_sgd_epsilon")
            if eps is not None and u.client in index:
                table[index[u.client]] = float(eps)
        return table

    @functools.cached_property
    def _client_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.manifest.client_ids)}

    def dp_sgd_metrics(self, state: ServerState) -> dict[str, float]:
        """``privacy/dp_sgd_epsilon_max`` and ``_mean`` over the clients that have trained so far
        (empty without DP-SGD)."""
        if self.dp_sgd is None:
            return {}
        return client_epsilons(state.optimizer.get(EPSILON_KEY))

    def regroup_due(self, state: ServerState) -> bool:
        return self.grouping_method == "cluster" and state.round + 1 == self.grouping.warmup_rounds


def _fresh_head(head: torch.nn.Module) -> torch.Tensor:
    """A new random initialisation of ``head`` (each layer's own ``reset_parameters``), flat."""
    clone = copy.deepcopy(head)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return flat(clone)


def check_update(update: ClientUpdate, state: ServerState) -> None:
    """Reject an update whose shapes do not match the server's or that holds NaN/inf."""
    parts = {}
    if update.delta_base is not None:
        parts["base"] = (update.delta_base, state.base)
    ref_heads = state.heads_for(update.group)
    if update.delta_heads and set(update.delta_heads) != set(ref_heads):
        raise RejectedUpdate(
            f"client '{update.client}': update has heads {sorted(update.delta_heads)}, "
            f"expected {sorted(ref_heads)}"
        )
    parts.update({f"head '{t}'": (update.delta_heads[t], ref_heads[t]) for t in update.delta_heads})
    for name, (delta, ref) in parts.items():
        if delta.shape != ref.shape:
            raise RejectedUpdate(
                f"client '{update.client}': {name} update has shape {tuple(delta.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(delta).all():
            raise RejectedUpdate(f"client '{update.client}': {name} update holds NaN or inf")


def update_norm(update: ClientUpdate) -> float:
    """The L2 norm of everything ``update`` releases (base and heads together), in float64."""
    parts = ([update.delta_base] if update.delta_base is not None else []) + list(update.delta_heads.values())
    return math.sqrt(sum(float(torch.sum(p.to(torch.float64) ** 2)) for p in parts))


#: Where adaptive clipping keeps C in the server state (with the optimiser's moments).
CLIP_KEY = "privacy/clip"


def participants(fed: Federation, clients: list[str], per_round: float, round_: int) -> list[str]:
    """This round's clients: a fixed-size sample, or, under DP, a Poisson sample at the same rate."""
    if fed.privacy.dp:  # who takes part must be secret: the sampling amplification ε counts on it
        return poisson_sample(clients, sample_rate(per_round, len(clients)),
                              fed.secret.stream("round", round_, "participation"))
    return clients_for_round(clients, per_round, fed.seed, round_)


def sat_out_clients(failed: dict[str, ClientFailure]) -> list[str]:
    """The clients of a round's failures that sat out because their DP-SGD budget was spent."""
    return [c for c, f in failed.items() if f.kind is FailureKind.BUDGET_SPENT]
