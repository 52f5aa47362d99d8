"""The clients' side of a round (:class:`ClientSteps`, a part of
:class:`fedmtl.federation.Federation`): what runs where a client's data is. Reading its
partition (checked against the digest validation recorded), local training
(:meth:`ClientSteps.client_round`, under DP-SGD inside :attr:`Federation.sample_level`), a shard of
clients at once (:meth:`ClientSteps.train_clients`: batched over clients with a batchable method,
:mod:`fedmtl.client.batched`), and evaluation on the client's held-out rows, per client or pooled
into sums (:mod:`fedmtl.privacy.evaluation`). A client's personal state stays in its store.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fedmtl.algorithms import ALL, ClientContext
from fedmtl.client.batched import BatchingUnsupported, SharedJob, batching_blocker, train_shared
from fedmtl.client.data import ClientData, PartitionChanged, PartitionError, load_client_data
from fedmtl.client.training import client_seed
from fedmtl.eval.metrics import VARIANTS, evaluate_clients
from fedmtl.privacy.evaluation import StatLayout, pooled_evaluation, statistics_score
from fedmtl.privacy.sample_level import LEDGER, Ledger
from fedmtl.server.grouping import WARMUP_GROUP, choose_group
from fedmtl.server.screening import RejectedUpdate, check_update
from fedmtl.state import ClientFailure, ClientUpdate, ServerState


class ClientSteps:
    """The client-side methods of :class:`fedmtl.federation.Federation` (its fields and
    privacy stages are defined there)."""

    def data(self, client: str) -> ClientData:
        """The client's partition, cached while its file is unchanged; with ``partition_digests``,
        only the very file validation passed. Raises a :class:`fedmtl.client.data.PartitionError`
        naming the client and the file when it cannot be used."""
        expected = None
        if self.partition_digests is not None:
            expected = self.partition_digests.get(client)
            if expected is None:
                raise PartitionChanged(
                    f"client '{client}': its partition did not pass validation (no "
                    "validated SHA-256 of it): it sits out",
                    client,
                )
        return load_client_data(self.partitions_dir, self._manifest_key, client, expected)

    def _generator(self, client: str, round_: int, purpose: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(client_seed(self.seed, round_, client, purpose))

    def context(self, client: str, round_: int, purpose: str = "") -> ClientContext:
        generator = self._generator(client, round_, purpose)
        return ClientContext(
            self.new_model(), list(self.manifest.tasks), self.local, generator, round_
        )

    def group_of(
        self, client: str, state: ServerState, data: ClientData, ctx: ClientContext
    ) -> str:
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
        """The client's partition as it trains on it: a label-flipping attacker's labels
        flipped."""
        return self.faults.poison_data(self.data(client), self.manifest.tasks, self.byzantine)

    def client_round(self, client: str, state: ServerState, attempt: int = 0) -> ClientUpdate:
        """Local training on ``client``: keeps its personal state, returns what it releases.
        Under ``privacy.dp_sgd.enabled`` the round runs inside :attr:`sample_level`: every SGD step
        is a DP-SGD step, the round's steps go to the client's ledger and its ε is reported with the
        update (``dp_sgd_epsilon``), or, when the round would take it above the target, it sits
        the round out (:class:`~fedmtl.privacy.sample_level.DPSGDBudgetSpent`; nothing of it is
        kept or released)."""
        self.faults.before_training(client, state.round + 1, attempt)
        private = self.sample_level
        if private is not None:
            ledger = Ledger.from_tensor(self.store.load_record(client, LEDGER, at_most=state.round))
            session = private.begin(client, state.round, ledger)
        data = self.train_data(client)
        ctx = self.context(client, state.round)
        group = self.group_of(client, state, data, ctx)
        if private is not None:
            ctx.cfg = dataclasses.replace(ctx.cfg, dp_sgd=session)
        update, personal = self.algorithm.client_round(
            ctx, state, data, group, self.store.load(client, at_most=state.round)
        )
        update = self.faults.poison_update(update, state.round + 1, self.byzantine)
        check_update(update, state)
        if private is not None:
            ledger, eps = private.end(client, state.round, ledger, session)
            self.store.save_record(client, LEDGER, ledger.to_tensor(), state.round + 1)
            update.metrics["dp_sgd_epsilon"] = eps
        if personal is not None:
            self.store.save(client, personal, state.round + 1)
        return update

    def batching_blocker(self, model: torch.nn.Module | None = None) -> str | None:
        """Why this federation's clients cannot be trained in a batch, or None if they can."""
        if self.sample_level is not None:
            return (
                "privacy.dp_sgd.enabled: DP-SGD clips each row's gradient "
                "(Opacus per-sample gradients), "
                "which the batched step (torch.func over clients) does not compute"
            )
        if not self.algorithm.batchable:
            return (
                f"algorithm.method '{self.algorithm.name}' has its own client procedure, not the "
                "standard shared step "
                "(batchable methods: fedmtl, fedavg, fedavg-ft, FedProx via prox_mu)"
            )
        return batching_blocker(model if model is not None else self.new_model())

    def train_rows(self) -> dict[str, int]:
        """Each client's training rows, from the manifest (what balances a round's shards)."""
        return {c.client: c.n_train for c in self.manifest.clients}

    def uses_batching(self, model: torch.nn.Module | None = None) -> bool:
        """Whether :meth:`train_clients` trains in batches; ``batched: on`` with a method or
        model that does not allow it raises :class:`BatchingUnsupported` naming the reason."""
        if self.batched not in ("auto", "on", "off"):
            raise ValueError(
                f"training.batched = {self.batched!r} is not allowed; allowed values: auto, on, off"
            )
        if self.batched == "off":
            return False
        reason = self.batching_blocker(model)
        if reason is not None and self.batched == "on":
            raise BatchingUnsupported(
                f"training.batched is 'on' but {reason}; use training.batched=auto or off"
            )
        return reason is None

    def train_clients(
        self,
        clients: list[str],
        state: ServerState,
        failed: dict[str, ClientFailure] | None = None,
        attempt: int = 0,
    ) -> list[ClientUpdate]:
        """Local training of a shard of clients, in order: batched when the method and model
        allow it and ``training.batched`` is not off, else :meth:`client_round` per client.

        ``failed`` None: a client that fails (missing data, rejected update) raises, as
        :meth:`client_round` does. A dict: the client is left out of the result and its error
        recorded there (client -> :class:`~fedmtl.state.ClientFailure`), so one bad client does
        not fail its shard.
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
                ctx = ClientContext(
                    model, tasks, self.local, self._generator(client, state.round), state.round
                )
                group = self.group_of(client, state, data, ctx)
                personal = self.store.load(client, at_most=state.round)
                start = self.algorithm.shared_start(self.local, state, group, personal)
            except Exception as exc:  # noqa: BLE001
                if failed is None:
                    raise
                failed[client] = ClientFailure.of(exc)
                continue
            prepared.append((client, data, group, personal, start, ctx.generator))
        jobs = [
            SharedJob(data, start.base, start.heads, gen, start.prox_mu)
            for _, data, _, _, start, gen in prepared
        ]
        trained = train_shared(model, tasks, self.local, jobs)
        updates = []
        for (client, data, group, personal, start, _), (base, heads, loss) in zip(
            prepared, trained
        ):
            update, keep = self.algorithm.shared_result(
                data, group, state, start, base, heads, loss, personal
            )
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

    def evaluate_clients(
        self,
        clients: list[str],
        state: ServerState,
        skipped: dict[str, ClientFailure] | None = None,
    ) -> list[dict]:
        """Each client scores the global, group and personalised models on its own held-out
        split (records in client order). Personalisation runs per client (it may fit a
        personal head and keep it in the client's store); the scoring is batched over the
        clients (:func:`fedmtl.eval.metrics.evaluate_clients`), with one model for them all.

        ``skipped`` None: a client whose partition cannot be used raises its
        :class:`fedmtl.client.data.PartitionError`. A dict: that client is left out of the records
        and its failure recorded there (client -> :class:`~fedmtl.state.ClientFailure`), so one
        bad client does not stop the round."""
        model, jobs, groups = self._evaluation_jobs(clients, state, skipped)
        records = evaluate_clients(model, jobs, self.manifest.tasks)
        for r in records:
            r["assigned_group"] = groups[r["client"]]
        return records

    def evaluate_pooled(
        self,
        clients: list[str],
        state: ServerState,
        skipped: dict[str, ClientFailure] | None = None,
    ) -> dict[str, float]:
        """Private evaluation (``privacy.evaluation.client_metrics`` off): the same scoring, but
        each client reduces its scores to sufficient statistics (confusion counts, error sums) and
        only their sum over the clients comes out, through the secure sum when
        ``privacy.secure_sum`` is on, noised (``privacy.evaluation``)
        (:mod:`fedmtl.privacy.evaluation`): metrics ``{variant}/{metric}/pooled``. ``skipped``: as
        for :meth:`evaluate_clients` (a skipped client adds nothing to the sums)."""
        model, jobs, _ = self._evaluation_jobs(clients, state, skipped)
        tasks = list(self.manifest.tasks)
        records = evaluate_clients(model, jobs, tasks, score=statistics_score)
        spec, secure = self.privacy, self.privacy.secure_sum
        return pooled_evaluation(
            StatLayout.build(VARIANTS, tasks),
            records,
            secure=spec.secure,
            max_rows=max((c.n_test for c in self.manifest.clients), default=1),
            min_clients=spec.min_group_size,
            noise_std=spec.evaluation.noise,
            noise_multiplier=spec.evaluation.noise_multiplier if spec.dp else None,
            generator=self.secret.stream("server", state.round, "evaluation-noise"),
            neighbours=secure.neighbours,
            max_dropout=secure.max_dropout,
            protocol=secure.protocol,
        )

    def _evaluation_jobs(
        self,
        clients: list[str],
        state: ServerState,
        skipped: dict[str, ClientFailure] | None = None,
    ):
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
            ctx = ClientContext(
                model,
                tasks,
                self.local,
                self._generator(client, state.round, "evaluate"),
                state.round,
            )
            group = self.group_of(client, state, data, ctx)
            base, heads, keep = self.algorithm.personalized(
                ctx, state, data, group, self.store.load(client, at_most=state.round)
            )
            if keep is not None:
                self.store.save(client, keep, state.round)
            jobs.append(
                (
                    data,
                    {
                        "global": (state.base, state.global_heads),
                        "group": (state.base, state.heads_for(group)),
                        "personal": (base, heads),
                    },
                )
            )
            groups[client] = group
        return model, jobs, groups
