"""FedRoD's defining properties: the generic head learns under the balanced softmax (the client's
label prior taken out), a personalised head learns on top of it, and the personalised model is
θ with φ + ψ_c."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedmtl.algorithms.fedrod import balanced_logits
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from tests.conftest import tiny_overrides


def test_the_balanced_softmax_takes_the_label_prior_out():
    """A head that predicts the class prior alone is optimal for plain cross-entropy; under the
    balanced softmax the optimum is the uniform head: the prior is the loss's, not the head's."""
    counts = torch.tensor([90.0, 9.0, 1.0])
    y = torch.repeat_interleave(torch.arange(3), counts.long())
    prior_logits = counts.log().expand(len(y), 3)
    uniform = torch.zeros(len(y), 3)
    assert F.cross_entropy(prior_logits, y) < F.cross_entropy(uniform, y)
    assert F.cross_entropy(balanced_logits(uniform, counts), y) < F.cross_entropy(
        balanced_logits(prior_logits, counts), y
    )
    # an unseen class costs no NaN
    unseen = balanced_logits(uniform, torch.tensor([90.0, 10.0, 0.0]))
    assert torch.isfinite(F.cross_entropy(unseen, y))


def test_fedrod_releases_body_and_generic_head_and_serves_their_sum_with_its_own(tmp_path):
    settings = {"algorithm.method": "fedrod", "training.local_epochs": 3}
    cfg = load_config(None, tiny_overrides(tmp_path, **settings))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    start = fed.initial_state()
    client = manifest.client_ids[0]
    update = fed.client_round(client, start)
    assert float(update.delta_base.norm()) > 0 and float(update.delta_heads["label"].norm()) > 0
    own = fed.store.load(client, at_most=1)
    assert own is not None and not torch.equal(own.heads["label"], start.global_heads["label"])

    state, _, history = run_rounds(fed, manifest.client_ids, 4, state=start)
    own = fed.store.load(client, at_most=state.round)
    data = fed.data(client)
    ctx = fed.context(client, state.round, "evaluate")
    base, heads, _ = fed.algorithm.personalized(ctx, state, data, "all", own)
    assert torch.equal(base, state.base)
    assert torch.equal(heads["label"], state.global_heads["label"] + own.heads["label"])
    assert history[-1]["personal/accuracy/mean"] > history[-1]["global/accuracy/mean"]
