"""Round checkpoints (fedmtl/lifecycle/checkpoint.py): atomic, checksummed, never loaded when
damaged."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fedmtl.lifecycle.checkpoint import (
    Checkpoint,
    CheckpointStore,
    CorruptCheckpoint,
    capture_rng,
    record_table,
    restore_rng,
    table_record,
)
from fedmtl.lifecycle.runs import ResumeError, RunRecord, find_resumable
from fedmtl.state import ServerState


def state(round_: int) -> ServerState:
    g = torch.Generator().manual_seed(round_)
    return ServerState(
        round_,
        torch.randn(50, generator=g),
        {"0": {"label": torch.randn(7, generator=g)}},
        {"label": torch.randn(7, generator=g)},
        {"c1": "0"},
        {"m": torch.randn(50, generator=g)},
    )


def save_rounds(store: CheckpointStore, rounds, background: bool = False) -> None:
    for r in rounds:
        store.save(
            Checkpoint(state(r), {"summary": {"acc": r / 10}}, {"start_round": 0}, capture_rng()),
            background=background,
        )
    store.close()


@pytest.mark.parametrize("background", [False, True])
def test_a_checkpoint_round_trips_exactly_and_only_the_newest_states_are_kept(tmp_path, background):
    store = CheckpointStore(tmp_path, keep=2)
    save_rounds(store, [1, 2, 3], background)
    assert store.rounds() == [2, 3]
    loaded = store.load(3)
    want = state(3)
    assert loaded.round == 3 and torch.equal(loaded.state.base, want.base)
    assert torch.equal(loaded.state.optimizer["m"], want.optimizer["m"])
    assert loaded.state.assignment == {"c1": "0"} and loaded.extra == {"start_round": 0}
    assert [r["summary"]["acc"] for r in store.records(3)] == [
        0.1,
        0.2,
        0.3,
    ]  # every round's record stays
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
        (
            lambda p: p.write_bytes(
                p.read_bytes()[:100] + bytes([p.read_bytes()[100] ^ 1]) + p.read_bytes()[101:]
            ),
            "SHA-256",
        ),
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.with_suffix(".json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_a_damaged_checkpoint_is_reported_and_never_loaded(tmp_path, damage, phrase):
    store = CheckpointStore(tmp_path, keep=2)
    save_rounds(store, [1, 2])
    damage(tmp_path / "round-000002.pt")
    with pytest.raises(CorruptCheckpoint, match=phrase) as info:
        store.load(2)
    assert "round-000002" in str(info.value)
    good, problems = store.latest()  # falls back to the previous checkpoint
    assert good.round == 1 and len(problems) == 1 and phrase in problems[0]


def test_an_uncommitted_write_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    save_rounds(store, [1, 2])
    (tmp_path / "round-000002.json").unlink()  # the crash came before the commit record
    assert store.rounds() == [1] and store.latest()[0].round == 1


def test_random_states_are_restored(tmp_path):
    saved = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(first[0], again[0])
        and np.array_equal(first[1], again[1])
        and first[2] == again[2]
    )
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(state(1), {}, {}, saved))
    restore_rng(store.load(1).rng)
    assert torch.equal(torch.rand(3), first[0])


def test_tables_round_trip_through_round_records():
    import pandas as pd

    frame = pd.DataFrame({"client": ["007", "a"], "group": ["0", "1"], "acc": [0.5, float("nan")]})
    back = record_table([{"t": table_record(frame)}, {}, {"t": table_record(frame)}], "t")
    assert list(back["client"]) == ["007", "a", "007", "a"] and back["acc"].isna().sum() == 2


def test_the_writing_store_gives_back_its_records_as_a_fresh_store_reads_them(tmp_path):
    import pandas as pd

    writer = CheckpointStore(tmp_path)
    frame = pd.DataFrame({"client": ["007", "a"], "acc": [0.5, float("nan")]})
    for r in (1, 2):
        writer.save(
            Checkpoint(
                state(r),
                {"summary": {"acc": r / 10}, "clients": table_record(frame)},
                {},
                capture_rng(),
            ),
            background=True,
        )
    writer.wait()
    from_disk = CheckpointStore(tmp_path).records(2)
    kept = writer.records(2)
    writer.close()
    assert (
        [r["summary"] for r in kept]
        == [r["summary"] for r in from_disk]
        == [{"acc": 0.1}, {"acc": 0.2}]
    )
    pd.testing.assert_frame_equal(record_table(kept, "clients"), record_table(from_disk, "clients"))


def test_resume_finds_the_unfinished_run_with_the_same_settings_or_says_what_differs(tmp_path):
    settings = {
        "training.rounds": 4,
        "training.lr": 0.05,
        "faults.crash_at_round": 3,
        "runner.kind": "thread",
    }
    RunRecord("aaa", settings, "v1", "flow-1", "mlflow-1").save(tmp_path / "aaa")
    RunRecord("done", settings, "v1", None, "mlflow-0", finished=True).save(tmp_path / "done")
    same = {**settings, "faults.crash_at_round": None, "runner.kind": "process"}  # free to differ
    path, run = find_resumable(tmp_path, same, "v1", latest=True)
    assert run.key == "aaa" and path == tmp_path / "aaa"
    assert (
        find_resumable(tmp_path, {"x": 1}, "v9", flow_run_id="flow-1")[1].key == "aaa"
    )  # a retried flow run
    assert find_resumable(tmp_path, same, "v1") is None  # not asked to resume
    with pytest.raises(ResumeError, match=r"training.lr: 0.05 then, 0.1 now"):
        find_resumable(tmp_path, {**settings, "training.lr": 0.1}, "v1", latest=True)
    with pytest.raises(ResumeError, match="data version is v2, the run trained on v1"):
        find_resumable(tmp_path, settings, "v2", latest=True)
    with pytest.raises(ResumeError, match="nothing to resume"):
        find_resumable(tmp_path / "empty", settings, "v1", latest=True)
    assert json.loads((tmp_path / "aaa" / "run.json").read_text())["finished"] is False


class _Evil:
    """A pickle that runs code when loaded without ``weights_only``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_tampered_checkpoint_or_client_store_never_runs_code(tmp_path):
    import hashlib

    from fedmtl.client.store import ClientStore, CorruptState, client_folder

    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path / "ckpt")
    save_rounds(store, [1])
    pt, record = tmp_path / "ckpt" / "round-000001.pt", tmp_path / "ckpt" / "round-000001.json"
    torch.save({"format": 1, "state": _Evil(marker), "rng": {}}, pt)
    meta = json.loads(record.read_text())  # the attacker fixes the checksum too
    payload = pt.read_bytes()
    meta.update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    record.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match="cannot be decoded"):
        store.load(1)
    clients = ClientStore(tmp_path / "clients")
    folder = tmp_path / "clients" / client_folder("c1")
    folder.mkdir(parents=True)
    torch.save({"heads": _Evil(marker), "base": None}, folder / "personal-r000001.pt")
    with pytest.raises(
        CorruptState, match="client 'c1': its personal state .*personal-r000001.pt cannot be read"
    ):
        clients.load("c1")
    assert not marker.exists()
