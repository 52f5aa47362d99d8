"""FedBABU's defining property: the head is never trained during federated training (it stays
at its random initialisation on the server and is frozen in every client's round), while the base
learns; personalisation fine-tunes base and head from the global model."""

from __future__ import annotations

import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from tests.conftest import tiny_overrides


def test_fedbabu_trains_the_body_under_a_frozen_random_head_then_fine_tunes(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"algorithm.method": "fedbabu"}))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    start = fed.initial_state()
    client = manifest.client_ids[0]

    update = fed.client_round(client, start)
    assert update.delta_heads == {}  # the head is not released
    assert float(update.delta_base.norm()) > 0  # the body trains

    state, records, history = run_rounds(fed, manifest.client_ids, 2, state=start)
    for task, head in state.global_heads.items():
        assert torch.equal(head, start.global_heads[task])  # still the random initialisation
    assert not torch.equal(state.base, start.base)

    # the personalised model: base and head fine-tuned from the global model on the client
    personal = fed.store.load(client, at_most=state.round)
    assert personal is not None and personal.base is not None
    assert not torch.equal(personal.base, state.base)
    assert not torch.equal(personal.heads["label"], state.global_heads["label"])
    personalised = history[-1]["personal/accuracy/mean"]
    assert personalised > history[-1]["global/accuracy/mean"]
