"""Privacy benchmark: what secure aggregation costs and what differential privacy costs in accuracy.

    python -m benchmarks.privacy [--quick] [--parts secagg,dp,ckks] [--update]

writes ``benchmarks/results/privacy.md`` and ``privacy.json``. Parts (each in this process):

- **secagg**: the core round (batched local training, aggregation, server step) of 10, 100 and
  500 Synthetic clients (MLP 60-64-10, 5 local epochs) with plain and with SecAgg+ aggregation;
  seconds per round, the protocol's own seconds, and the largest difference between the secure
  and the plain group means; with the default graph (sized for 10 % dropout) and, from 100
  clients up, with the graph sized for 30 %. Then recovery: SecAgg+ over 100 clients with 0 %,
  10 % and 30 % of them silent between masking and unmasking (graphs sized for 10 % and for
  30 %), over ``trials`` sessions: how many sums were recovered and their largest error.
- **ckks** (not in the default parts; needs the ``he`` extra): the same core round of 10 and 100
  Synthetic clients, each round's updates aggregated three ways — plainly, with SecAgg+ (default
  graph) and with CKKS homomorphic encryption (:mod:`fedmtl.privacy.he`, a fresh key per round)
  — the round's seconds for each, the protocols' own seconds, the largest difference from the
  plain group means, and the bytes one client sends.
- **dp**: fedmtl without DP and with DP at noise multipliers z giving ε ≈ 8, 4, 2 and 1
  (δ = 1e-5, from the accountant), 50 rounds, on two scenarios: Synthetic(0.5, 0.5) with 1,000
  clients, 10 % Poisson-sampled per round, multinomial logistic regression; and digits split
  over 200 clients in 2 label-permutation groups, 30 % sampled per round, MLP 64-64-10.
  Personalised and global accuracy (client means on the held-out 25 %), and the
  membership-inference attack on the model a run registers (base + group heads): Yeom et al.'s
  loss threshold (:func:`fedmtl.privacy.attacks.loss_threshold_attack`), every client's train rows
  (members) against its held-out rows (non-members), each scored with its own group's heads.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_results
from benchmarks.scale import InMemoryFederation
from fedmtl.client.data import ClientData, encode_labels
from fedmtl.client.store import ClientStore
from fedmtl.config import PrivacyConfig, load_config
from fedmtl.data.manifest import ClientEntry, Manifest
from fedmtl.data.partitioners import label_permutation, permute_labels
from fedmtl.data.sources import client_ids, generate_synthetic, load_digits
from fedmtl.eval.metrics import summarize
from fedmtl.federation import Federation
from fedmtl.privacy.accounting import epsilon_after
from fedmtl.privacy.aggregation import private_aggregate
from fedmtl.privacy.attacks import (
    lira_offline,
    lira_online,
    logit_confidence,
    loss_threshold_attack,
    per_example_loss,
    split_in_out,
)
from fedmtl.privacy.budget import noise_for
from fedmtl.privacy.secagg import SecAggError, default_neighbours, secure_sum
from fedmtl.rounds import run_rounds
from fedmtl.server.aggregation import group_aggregate
from fedmtl.state import ServerState, assign

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(
    n_clients: int, test_fraction: float = 0.25, seed: int = 0
) -> tuple[Manifest, dict[str, ClientData]]:
    """Synthetic(0.5, 0.5) clients in memory, each split into train and held-out rows."""
    cfg = load_config(None, [f"data.synthetic.n_clients={n_clients}"])
    raw = generate_synthetic(cfg.data.synthetic, seed)
    frame, task = raw.frame, raw.tasks[0]
    x_all = frame[raw.features].to_numpy(dtype=np.float32)
    y_all = encode_labels(frame[task.name].to_numpy(), task).numpy()
    rng = np.random.default_rng(seed)
    memory, entries = {}, []
    for cid, rows in frame.groupby("client", sort=True).indices.items():
        rows = rng.permutation(rows)
        cut = max(1, int(round(len(rows) * (1 - test_fraction))))
        tr, te = rows[:cut], rows[cut:]
        cid = str(cid)
        memory[cid] = ClientData(
            cid,
            "0",
            torch.from_numpy(x_all[tr]),
            {task.name: torch.from_numpy(y_all[tr])},
            torch.from_numpy(x_all[te]),
            {task.name: torch.from_numpy(y_all[te])},
        )
        entries.append(ClientEntry(cid, "0", f"{cid}.parquet", len(tr), len(te)))
    return Manifest("synthetic", "natural", list(raw.features), list(raw.tasks), entries), memory


def digits(
    n_clients: int, n_groups: int = 2, test_fraction: float = 0.25, seed: int = 0
) -> tuple[Manifest, dict[str, ClientData]]:
    """scikit-learn's digits split iid over ``n_clients`` clients in ``n_groups`` label-permutation
    groups (group g > 0 sees the classes renamed by its own permutation), in memory."""
    raw = load_digits()
    task = raw.tasks[0]
    x_all = raw.frame[raw.features].to_numpy(dtype=np.float32)
    y_all = raw.frame[task.name].to_numpy()
    rng = np.random.default_rng(seed)
    split = label_permutation(y_all, n_clients, rng, n_groups, len(task.classes))
    memory, entries = {}, []
    for cid, rows, group in zip(client_ids(n_clients), split.indices, split.groups):
        rows = rng.permutation(rows)
        cut = max(1, int(round(len(rows) * (1 - test_fraction))))
        y = torch.from_numpy(permute_labels(y_all[rows], split.transforms[group]).astype(np.int64))
        x = torch.from_numpy(x_all[rows])
        memory[cid] = ClientData(
            cid, str(group), x[:cut], {task.name: y[:cut]}, x[cut:], {task.name: y[cut:]}
        )
        entries.append(ClientEntry(cid, str(group), f"{cid}.parquet", cut, len(rows) - cut))
    return Manifest(
        "digits",
        "label-permutation",
        list(raw.features),
        list(raw.tasks),
        entries,
        input_shape=raw.input_shape,
        true_groups=True,
    ), memory


def federation(manifest, memory, overrides: list[str], root: str) -> InMemoryFederation:
    cfg = load_config(None, overrides)
    base = Federation.from_config(cfg, manifest, ClientStore(Path(root)))
    return InMemoryFederation(
        **{f: getattr(base, f) for f in base.__dataclass_fields__ if not f.startswith("_")},
        memory=memory,
    )


# -- secure aggregation -----------------------------------------------------------------------

#: the rounds whose updates the secure-aggregation parts sum: FedAvg on an MLP 60-64-10
PROTOCOL_WORKLOAD = [
    "model.hidden=[64]",
    "algorithm.method=fedavg",
    "training.local_epochs=5",
    "training.lr=0.05",
]


def part_secagg(sizes: list[int], rounds: int, trials: int) -> dict:
    out = {"rounds": [], "dropout": [], "load_average": [os.getloadavg()[0]]}
    # (clients, the dropout the graph is sized for): the default 10 %, and 30 % from 100 clients up
    runs = [(n, 0.1) for n in sizes] + [(n, 0.3) for n in sizes if n >= 100]
    for n, max_dropout in runs:
        manifest, memory = synthetic(n)
        with tempfile.TemporaryDirectory() as tmp:
            fed = federation(manifest, memory, PROTOCOL_WORKLOAD, tmp)
            clients = manifest.client_ids
            state = fed.initial_state()
            plain, secure, protocol, error = [], [], [], 0.0
            plain_cpu, secure_cpu = [], []
            spec = PrivacyConfig(
                secure_sum={"enabled": True, "range": 1.0, "max_dropout": max_dropout}
            )
            scale = float(max(e.n_train for e in manifest.clients))
            for r in range(rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                updates = fed.train_clients(clients, state)
                t1, c1 = time.perf_counter(), time.process_time()
                groups = group_aggregate(updates)
                t2, c2 = time.perf_counter(), time.process_time()
                private, report = private_aggregate(
                    updates, spec, 1.0, {}, scale, torch.Generator(), r
                )
                t3, c3 = time.perf_counter(), time.process_time()
                state = fed.merge(state, groups)
                t4, c4 = time.perf_counter(), time.process_time()
                plain.append(t2 - t0 + (t4 - t3))
                secure.append(t1 - t0 + (t3 - t2) + (t4 - t3))
                plain_cpu.append(c2 - c0 + (c4 - c3))
                secure_cpu.append(c1 - c0 + (c3 - c2) + (c4 - c3))
                protocol.append(report.secagg_seconds)
                for g, agg in groups.items():
                    error = max(error, float((agg.delta_base - private[g].delta_base).abs().max()))
        row = {
            "clients": n,
            "max_dropout": max_dropout,
            "k": default_neighbours(n, max_dropout),
            "plain_round_s": float(np.median(plain)),
            "secure_round_s": float(np.median(secure)),
            "protocol_s": float(np.median(protocol)),
            "max_abs_error": error,
            "dim": int(state.base.numel() + sum(v.numel() for v in state.global_heads.values())),
            # process CPU seconds: what the one process itself spent, insensitive to other
            # work on a shared machine (the wall-clock figures are not)
            "plain_round_cpu_s": float(np.median(plain_cpu)),
            "secure_round_cpu_s": float(np.median(secure_cpu)),
        }
        row["ratio"] = row["secure_round_s"] / row["plain_round_s"]
        row["ratio_cpu"] = row["secure_round_cpu_s"] / row["plain_round_cpu_s"]
        out["rounds"].append(row)
        print("secagg", row, flush=True)

    rng = np.random.default_rng(0)
    n, dim = 100, 5000
    for max_dropout in (0.1, 0.3):
        for fraction in (0.0, 0.1, 0.3):
            recovered, worst, seconds = 0, 0.0, []
            for _ in range(trials):
                vectors = {f"c{i:03d}": rng.uniform(-1, 1, dim) for i in range(n)}
                dropped = rng.choice(
                    sorted(vectors), size=int(fraction * n), replace=False
                ).tolist()
                try:
                    result = secure_sum(
                        vectors, clip=1.0, max_dropout=max_dropout, drop_after_masking=dropped
                    )
                except SecAggError:
                    continue
                recovered += 1
                seconds.append(result.seconds["total"])
                worst = max(
                    worst, float(np.abs(result.sum - np.sum(list(vectors.values()), axis=0)).max())
                )
            row = {
                "clients": n,
                "dropout": fraction,
                "max_dropout": max_dropout,
                "k": default_neighbours(n, max_dropout),
                "recovered": recovered,
                "trials": trials,
                "max_abs_error": worst,
                "seconds": float(np.median(seconds)) if seconds else None,
            }
            out["dropout"].append(row)
            print("dropout", row, flush=True)
    out["load_average"].append(os.getloadavg()[0])  # 1-minute load: other work on the machine
    return out


def part_ckks(sizes: list[int], rounds: int) -> dict:
    """Plain, SecAgg+ and CKKS aggregation of the same updates, round by round (see the module)."""
    from fedmtl.privacy.he import HEClient, KeyHolder

    out = {"rounds": [], "load_average": [os.getloadavg()[0]]}
    for n in sizes:
        manifest, memory = synthetic(n)
        with tempfile.TemporaryDirectory() as tmp:
            fed = federation(manifest, memory, PROTOCOL_WORKLOAD, tmp)
            clients = manifest.client_ids
            state = fed.initial_state()
            scale = float(max(e.n_train for e in manifest.clients))
            specs = {
                "secagg": PrivacyConfig(secure_sum={"enabled": True}),
                "ckks": PrivacyConfig(secure_sum={"enabled": True, "protocol": "ckks"}),
            }
            wall = {k: [] for k in ("plain", *specs)}
            cpu = {k: [] for k in ("plain", *specs)}
            protocol = {k: [] for k in specs}
            error = {k: 0.0 for k in specs}
            for r in range(rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                updates = fed.train_clients(clients, state)
                train, train_cpu = time.perf_counter() - t0, time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                groups = group_aggregate(updates)
                wall["plain"].append(time.perf_counter() - t0)
                cpu["plain"].append(time.process_time() - c0)
                for name, spec in specs.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    private, report = private_aggregate(
                        updates, spec, 1.0, {}, scale, torch.Generator(), r
                    )
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    protocol[name].append(report.secagg_seconds)
                    for g, agg in groups.items():
                        error[name] = max(
                            error[name], float((agg.delta_base - private[g].delta_base).abs().max())
                        )
                t0, c0 = time.perf_counter(), time.process_time()
                state = fed.merge(state, groups)
                merge, merge_cpu = time.perf_counter() - t0, time.process_time() - c0
                for name in wall:  # the round: training, this aggregation, the server step
                    wall[name][-1] += train + merge
                    cpu[name][-1] += train_cpu + merge_cpu
        dim = int(state.base.numel() + sum(v.numel() for v in state.global_heads.values()))
        holder = KeyHolder()
        sent = HEClient("c", holder.public_context).encrypt(np.zeros(dim + 1)).nbytes
        row = {
            "clients": n,
            "dim": dim,
            "ckks_bytes_per_client": sent,
            "plain_bytes_per_client": 4 * (dim + 1),
            **{f"{k}_round_s": float(np.median(v)) for k, v in wall.items()},
            **{f"{k}_round_cpu_s": float(np.median(v)) for k, v in cpu.items()},
            **{f"{k}_protocol_s": float(np.median(v)) for k, v in protocol.items()},
            **{f"{k}_max_abs_error": v for k, v in error.items()},
        }
        out["rounds"].append(row)
        print("ckks", row, flush=True)
    out["load_average"].append(os.getloadavg()[0])
    return out


# -- differential privacy ---------------------------------------------------------------------

SCENARIOS = {
    # name: (clients, sample rate, model overrides, quick clients, LiRA shadows (quick: half))
    "synthetic": (1000, 0.1, ["model.hidden=[]"], 300, 0),
    "digits": (200, 0.3, ["model.hidden=[64]"], 200, 8),
}


def group_model(fed: Federation, state: ServerState, group: str) -> torch.nn.Module:
    """The registered model as a client of ``group`` sees it: the base and its group's heads."""
    model = fed.new_model()
    assign(model.base, state.base)
    for name, head in state.heads_for(group).items():
        assign(model.heads[name], head)
    return model


def pools(fed: Federation, state: ServerState, clients: list[str]) -> dict[str, list[str]]:
    by_group: dict[str, list[str]] = {}
    for client in clients:
        by_group.setdefault(fed.release_group(client, state), []).append(client)
    return by_group


def membership_attack(fed: Federation, state: ServerState, clients: list[str]):
    """The loss-threshold attack on the registered model (base + group heads): every client's
    train rows are members, its held-out rows non-members, each scored with its group's heads."""
    task = fed.manifest.tasks[0].name
    members, nonmembers = [], []
    for group, ids in pools(fed, state, clients).items():
        model = group_model(fed, state, group)
        data = [fed.data(c) for c in ids]
        members.append(
            per_example_loss(
                model,
                torch.cat([d.x_train for d in data]),
                torch.cat([d.y_train[task] for d in data]),
                task,
            )
        )
        nonmembers.append(
            per_example_loss(
                model,
                torch.cat([d.x_test for d in data]),
                torch.cat([d.y_test[task] for d in data]),
                task,
            )
        )
    return loss_threshold_attack(np.concatenate(members), np.concatenate(nonmembers))


def lira_attacks(
    manifest: Manifest,
    memory: dict[str, ClientData],
    overrides: list[str],
    rounds: int,
    rate: float,
    target: ServerState,
    n_shadows: int,
    seed: int = 0,
):
    """LiRA (Carlini et al. 2022), online and offline, on the registered model: ``n_shadows``
    shadow federations are trained with the target's own settings, each on a random half of
    every client's rows (train and held-out together; each row is IN exactly half of the
    shadows); a row's logit-scaled confidence under the target is compared with its IN and OUT
    shadow statistics. Members: the clients' train rows; non-members: their held-out rows."""
    task = manifest.tasks[0].name
    ids = manifest.client_ids
    x = {c: torch.cat([memory[c].x_train, memory[c].x_test]) for c in ids}
    y = {c: torch.cat([memory[c].y_train[task], memory[c].y_test[task]]) for c in ids}
    sizes = [len(y[c]) for c in ids]
    member = np.concatenate([np.arange(n) < memory[c].n_train for c, n in zip(ids, sizes)])
    offsets = np.cumsum([0, *sizes])
    rng = np.random.default_rng(seed)
    in_mask = rng.random((offsets[-1], n_shadows)).argsort(axis=1) < n_shadows // 2

    def confidences(fed: Federation, state: ServerState) -> np.ndarray:
        conf = np.empty(offsets[-1])
        for group, members in pools(fed, state, ids).items():
            model = group_model(fed, state, group)
            for c in members:
                i = ids.index(c)
                conf[offsets[i] : offsets[i + 1]] = logit_confidence(model, x[c], y[c], task)
        return conf

    with tempfile.TemporaryDirectory() as tmp:
        target_conf = confidences(federation(manifest, memory, overrides, tmp), target)
    shadow = np.empty((offsets[-1], n_shadows))
    for k in range(n_shadows):
        shard, entries = {}, []
        for i, c in enumerate(ids):
            keep = torch.from_numpy(in_mask[offsets[i] : offsets[i + 1], k])
            if not keep.any():
                continue
            d = memory[c]
            shard[c] = ClientData(
                c, d.group, x[c][keep], {task: y[c][keep]}, x[c][:0], {task: y[c][:0]}
            )
            entries.append(ClientEntry(c, d.group, f"{c}.parquet", int(keep.sum()), 0))
        sub = Manifest(
            manifest.source,
            manifest.scheme,
            manifest.features,
            manifest.tasks,
            entries,
            input_shape=manifest.input_shape,
            seed=seed + k + 1,
            true_groups=manifest.true_groups,
        )
        with tempfile.TemporaryDirectory() as tmp:
            fed = federation(sub, shard, [*overrides, f"training.seed={seed + k + 1}"], tmp)
            state, _, _ = run_rounds(fed, sub.client_ids, rounds, rate, evaluate_every=rounds)
            fed = federation(
                manifest, memory, overrides, tmp
            )  # score every row, with its group's heads
            shadow[:, k] = confidences(fed, state)
    stats_in, stats_out = split_in_out(shadow, in_mask)
    return (
        lira_online(target_conf, stats_in, stats_out, member),
        lira_offline(target_conf, stats_out, member),
    )


def part_dp(
    scenario: str,
    n_clients: int,
    rate: float,
    model: list[str],
    rounds: int,
    targets: list[float],
    clip: float,
    shadows: int = 0,
) -> list[dict]:
    manifest, memory = synthetic(n_clients) if scenario == "synthetic" else digits(n_clients)
    clients = manifest.client_ids
    delta = 1e-5
    settings: list[tuple[str, float | None]] = [("none", None)]
    for eps in targets:
        settings.append(
            (f"ε≈{eps:g}", noise_for(eps, rounds, "poisson", sample_rate=rate, delta=delta))
        )
    rows = []
    for name, z in settings:
        overrides = [
            *model,
            "algorithm.method=fedmtl",
            "training.local_epochs=5",
            "training.lr=0.05",
            f"training.clients_per_round={rate}",
            "grouping.method=column",
        ]
        if z is not None:
            overrides += [
                "privacy.dp_fedavg.enabled=true",
                f"privacy.dp_fedavg.noise_multiplier={z}",
                f"privacy.dp_fedavg.clip_norm={clip}",
                "privacy.min_group_size=3",
            ]
        with tempfile.TemporaryDirectory() as tmp:
            fed = federation(manifest, memory, overrides, tmp)
            start = time.perf_counter()
            state, records, history = run_rounds(fed, clients, rounds, rate, evaluate_every=rounds)
            seconds = time.perf_counter() - start
            attack = membership_attack(fed, state, clients)
        lira = (
            lira_attacks(manifest, memory, overrides, rounds, rate, state, shadows)
            if shadows
            else ()
        )
        summary = summarize(records)
        row = {
            "scenario": scenario,
            "clients": n_clients,
            "sample_rate": rate,
            "rounds": rounds,
            "setting": name,
            "noise_multiplier": z,
            "clip": clip if z else None,
            "epsilon": epsilon_after(rounds, z, "poisson", sample_rate=rate, delta=delta)
            if z
            else None,
            "personal_accuracy": summary.get("personal/accuracy/mean"),
            "group_accuracy": summary.get("group/accuracy/mean"),
            "global_accuracy": summary.get("global/accuracy/mean"),
            "seconds": seconds,
            "attack_auc": attack.auc,
            "attack_advantage": attack.advantage,
            "attack_tpr_at_1pct_fpr": attack.tpr_at_1pct_fpr,
            "attack_members": attack.n_members,
            "attack_nonmembers": attack.n_nonmembers,
        }
        for result in lira:
            row[f"{result.name}_auc"] = result.auc
            row[f"{result.name}_tpr_at_1pct_fpr"] = result.tpr_at_1pct_fpr
        if lira:
            row["shadows"] = shadows
        rows.append(row)
        print("dp", row, flush=True)
    return rows


# -- report -------------------------------------------------------------------------------------


def report(results: dict, args) -> str:
    lines = [
        "# Privacy: what secure aggregation and differential privacy cost",
        "",
        f"`python -m benchmarks.privacy{' --quick' if args.quick else ''}` on this machine "
        f"({os.cpu_count()} cores, one process).",
        "",
    ]
    sec = results.get("secagg")
    if sec:
        lines += [
            "## Secure aggregation (SecAgg+) against plain aggregation",
            "",
            "The core round (batched local training of every client, aggregation, server step), "
            "Synthetic "
            "clients, MLP 60-64-10; the protocol runs all clients and the server in this one "
            "process.",
            "",
            'Wall-clock seconds (medians over the rounds); "× plain, CPU time" is the same ratio '
            "of the "
            "process's CPU seconds, which other work on a shared machine does not inflate"
            + (
                " (load average {:.1f} at the start of this part, {:.1f} at its end)".format(
                    sec["load_average"][0], sec["load_average"][1]
                )
                if "load_average" in sec
                else ""
            )
            + ".",
            "",
            "| clients | graph sized for dropout | k | coordinates | plain round (s) "
            "| with SecAgg+ (s) | × plain "
            "| protocol (s) | × plain, CPU time | max |secure − plain| |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sec["rounds"]:
            cpu = f"{r['ratio_cpu']:.2f}" if "ratio_cpu" in r else "–"
            lines.append(
                f"| {r['clients']} | {100 * r['max_dropout']:.0f} % | {r['k']} | {r['dim']:,} | "
                f"{r['plain_round_s']:.3f} | {r['secure_round_s']:.3f} | {r['ratio']:.2f} | "
                f"{r['protocol_s']:.3f} | {cpu} | {r['max_abs_error']:.1e} |"
            )
        lines += [
            "",
            "Clients silent between masking and unmasking (100 clients, 5,000 coordinates):",
            "",
            "| dropout | graph sized for | k | sums recovered | max |error| | protocol (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in sec["dropout"]:
            secs = f"{r['seconds']:.3f}" if r["seconds"] is not None else "–"
            lines.append(
                f"| {100 * r['dropout']:.0f} % | {100 * r['max_dropout']:.0f} % | {r['k']} | "
                f"{r['recovered']}/{r['trials']} | {r['max_abs_error']:.1e} | {secs} |"
            )
    he = results.get("ckks")
    if he:
        lines += [
            "",
            "## Homomorphic aggregation (CKKS) against SecAgg+ and plain aggregation",
            "",
            "The same core round; each round's updates are aggregated plainly, with SecAgg+ "
            "(graph sized for "
            "10 % dropout) and with CKKS (TenSEAL, N = 8192, scale 2^40, a fresh key per round), "
            "all "
            "parties in this one process. Wall-clock seconds per round (medians); CPU-time "
            "ratios in "
            "brackets (load average {:.1f} at the start, {:.1f} at the end).".format(
                *he["load_average"]
            ),
            "",
            "| clients | coordinates | plain round (s) | SecAgg+ round (s) | × plain "
            "| CKKS round (s) | × plain "
            "| SecAgg+ protocol (s) | CKKS protocol (s) | CKKS bytes per client "
            "| max |CKKS − plain| |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in he["rounds"]:
            p = r["plain_round_s"]
            lines.append(
                f"| {r['clients']} | {r['dim']:,} | {p:.3f} | {r['secagg_round_s']:.3f} | "
                f"{r['secagg_round_s'] / p:.2f} "
                f"({r['secagg_round_cpu_s'] / r['plain_round_cpu_s']:.2f}) | "
                f"{r['ckks_round_s']:.3f} | {r['ckks_round_s'] / p:.2f} "
                f"({r['ckks_round_cpu_s'] / r['plain_round_cpu_s']:.2f}) | "
                f"{r['secagg_protocol_s']:.3f} | "
                f"{r['ckks_protocol_s']:.3f} | {r['ckks_bytes_per_client'] / 1e6:.2f} MB "
                f"({r['ckks_bytes_per_client'] / r['plain_bytes_per_client']:.0f}× float32) | "
                f"{r['ckks_max_abs_error']:.1e} |"
            )
    dp = results.get("dp")
    if dp:
        lines += [
            "",
            "## Accuracy and membership inference against ε (DP-FedAvg)",
            "",
            "fedmtl, 50 rounds (quick: 20), δ = 1e-5, C = 1; accuracies are client means on the "
            "held-out 25 %; the attack is the loss threshold on the registered model (base + group "
            "heads), train rows against held-out rows.",
            "",
        ]
        for scenario in dict.fromkeys(r["scenario"] for r in dp):
            part = [r for r in dp if r["scenario"] == scenario]
            first = part[0]
            lines += [
                f"### {scenario}: {first['clients']:,} clients, {100 * first['sample_rate']:.0f} % "
                f"Poisson-sampled per round, {first['rounds']} rounds",
                "",
                "| setting | z | ε | personalised acc. | group acc. | global acc. | attack AUC | "
                "advantage | TPR @ 1 % FPR | seconds |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            lira = "lira_online_auc" in first
            if lira:
                lines[-2] = lines[-2].replace(
                    " seconds |", " LiRA online AUC | LiRA offline AUC | seconds |"
                )
                lines[-1] += "---|---|"
            for r in part:
                z = f"{r['noise_multiplier']:.2f}" if r["noise_multiplier"] else "–"
                eps = f"{r['epsilon']:.2f}" if r["epsilon"] else "∞ (no DP)"
                lines.append(
                    f"| {r['setting']} | {z} | {eps} | {r['personal_accuracy']:.4f} | "
                    f"{r['group_accuracy']:.4f} | {r['global_accuracy']:.4f} | "
                    f"{r['attack_auc']:.4f} | "
                    f"{r['attack_advantage']:.4f} | {r['attack_tpr_at_1pct_fpr']:.4f} | "
                    + (
                        f"{r['lira_online_auc']:.4f} | {r['lira_offline_auc']:.4f} | "
                        if lira
                        else ""
                    )
                    + f"{r['seconds']:.0f} |"
                )
            base = first["personal_accuracy"]
            at4 = [r for r in part if r["epsilon"] and r["epsilon"] <= 4.0 + 1e-6]
            if at4:
                r = at4[0]
                attacks = ("attack_auc", "lira_online_auc", "lira_offline_auc")

                def strongest(row: dict) -> str:
                    key = max((k for k in attacks if k in row), key=lambda k: row[k])
                    return (
                        f"{row[key]:.3f} "
                        f"({key.removesuffix('_auc').replace('attack', 'loss threshold')})"
                    )

                lines += [
                    "",
                    f"At ε = {r['epsilon']:.2f}: personalised accuracy "
                    f"{100 * (r['personal_accuracy'] - base):+.1f} "
                    "points from the non-private run (target: within 2 on Synthetic); "
                    "the strongest attack's "
                    f"AUC {strongest(r)} (target ≤ 0.55); without DP {strongest(first)}.",
                    "",
                ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--parts", default="secagg,dp", help="secagg, dp, ckks (the he extra), comma-separated"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="dp part: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy")
    parser.add_argument(
        "--update", action="store_true", help="keep the parts not run from the last results"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    results: dict = {}
    if args.update and args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())
    if "secagg" in parts:
        results["secagg"] = part_secagg(
            [10, 100] if args.quick else [10, 100, 500],
            2 if args.quick else 3,
            3 if args.quick else 10,
        )
    if "ckks" in parts:
        results["ckks"] = part_ckks([10, 100], 2 if args.quick else 3)
    if "dp" in parts:
        scenarios = args.scenarios.split(",")
        results["dp"] = [r for r in results.get("dp", []) if r["scenario"] not in scenarios]
        for scenario in scenarios:
            n, rate, model, quick_n, shadows = SCENARIOS[scenario]
            results["dp"] += part_dp(
                scenario,
                quick_n if args.quick else n,
                rate,
                model,
                20 if args.quick else 50,
                [8.0, 4.0, 2.0, 1.0],
                clip=1.0,
                shadows=shadows // 2 if args.quick else shadows,
            )
    write_results(args.out, report(results, args), results)


if __name__ == "__main__":
    main()
