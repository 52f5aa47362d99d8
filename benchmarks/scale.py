"""Many clients per round: Synthetic(0.5, 0.5) with multinomial logistic regression (FedAvg,
5 local epochs, batch 16, lr 0.05), its data held in memory (no partition files), through the
core's round: batched local training of every client (one shard, as the flow's thread runner
does for batched training), hierarchical aggregation and the server step.

Used by ``python -m benchmarks.speed`` (part ``scale``, each size in a process of its own, as a
training process runs it); on its own:

    python -m benchmarks.scale 1000 [ROUNDS] [--json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmtl.client.data import ClientData, encode_labels
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data.manifest import ClientEntry, Manifest
from fedmtl.data.sources import generate_synthetic
from fedmtl.federation import Federation
from fedmtl.server import aggregation
from fedmtl.server.dispatch import default_workers, shards


@dataclass(frozen=True)
class InMemoryFederation(Federation):
    """A federation whose clients' data is already in memory (the benchmark's stand-in for
    partition files: reading 10,000 Parquet files would measure the disk, not the round)."""

    memory: dict[str, ClientData] = field(default_factory=dict)

    def data(self, client: str) -> ClientData:
        return self.memory[client]


def synthetic_clients(n_clients: int, seed: int = 0) -> tuple[Manifest, dict[str, ClientData]]:
    cfg = load_config(None, [f"data.synthetic.n_clients={n_clients}"])
    raw = generate_synthetic(cfg.data.synthetic, seed)
    frame = raw.frame
    task = raw.tasks[0]
    x_all = frame[raw.features].to_numpy(dtype=np.float32)
    y_all = encode_labels(frame[task.name].to_numpy(), task).numpy()
    clients = frame["client"].astype(str).to_numpy()
    order = np.argsort(clients, kind="stable")
    bounds = np.flatnonzero(np.r_[True, clients[order][1:] != clients[order][:-1], True])
    memory, entries = {}, []
    empty_x, empty_y = torch.zeros(0, x_all.shape[1]), {task.name: torch.zeros(0, dtype=torch.long)}
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        cid = str(clients[rows[0]])
        memory[cid] = ClientData(
            cid,
            "0",
            torch.from_numpy(x_all[rows]),
            {task.name: torch.from_numpy(y_all[rows])},
            empty_x,
            empty_y,
        )
        entries.append(ClientEntry(cid, "0", f"{cid}.parquet", len(rows), 0))
    manifest = Manifest("synthetic", "natural", list(raw.features), list(raw.tasks), entries)
    return manifest, memory


def scale_round(n_clients: int, rounds: int = 3, workers: int | None = 1) -> tuple[float, float]:
    """(median seconds per round, MiB of client data) for ``n_clients`` clients per round."""
    manifest, memory = synthetic_clients(n_clients)
    data_mib = (
        sum(
            d.x_train.element_size() * d.x_train.nelement() + d.y_train["label"].nelement() * 8
            for d in memory.values()
        )
        / 2**20
    )
    cfg = load_config(
        None,
        [
            "model.hidden=[]",
            "algorithm.method=fedavg",
            "training.local_epochs=5",
            "training.batch_size=16",
            "training.lr=0.05",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        base = Federation.from_config(cfg, manifest, ClientStore(Path(tmp)))
        fed = InMemoryFederation(
            **{f: getattr(base, f) for f in base.__dataclass_fields__ if not f.startswith("_")},
            memory=memory,
        )
        state = fed.initial_state()
        clients = manifest.client_ids
        parts = shards(clients, None, workers or default_workers())
        times = []
        with ThreadPoolExecutor(len(parts)) as pool:
            for _ in range(rounds):
                start = time.perf_counter()
                updates = [
                    u for us in pool.map(lambda p: fed.train_clients(p, state), parts) for u in us
                ]
                state = fed.merge(state, aggregation.group_aggregate(updates))
                times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], data_mib


def main(argv: list[str]) -> None:
    import json
    import resource

    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    n = int(args[0]) if args else 1000
    r = int(args[1]) if len(args) > 1 else 3
    before = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # the process with its imports
    seconds, mib = scale_round(
        n, r, workers=1
    )  # as the flow's thread runner trains a batched round
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if as_json:
        print(
            json.dumps(
                {
                    "clients": n,
                    "round_s": seconds,
                    "peak_mib": peak,
                    "data_mib": mib,
                    "mib_per_client": (peak - before) / n,
                    "threads": torch.get_num_threads(),
                }
            )
        )
    else:
        print(
            f"{n} clients: {seconds:.2f} s per round, {mib:.0f} MiB of client data, "
            f"peak {peak:.0f} MiB"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
