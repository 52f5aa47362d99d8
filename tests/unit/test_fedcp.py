"""FedCP's defining properties: a policy per sample splits each feature dimension between the
personalised and the global head (p + g = 1, conditioned on the client's head), the global head
is frozen in the client's round and the client proposes ½ψ_c + ½φ, and the personalised model is
the server's base, policy network and φ with the client's own ψ_c."""

from __future__ import annotations

import pytest
import torch

from fedmtl.algorithms.fedcp import FedCPHead, mmd
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from fedmtl.state import assign, flat
from tests.conftest import tiny_overrides


def test_the_policy_splits_each_feature_between_the_two_heads_per_sample():
    torch.manual_seed(0)
    head = FedCPHead(torch.nn.Linear(6, 3))
    with torch.no_grad():
        head.personal.weight.normal_()
    f = torch.randn(5, 6)
    p, g = head.policies(f)
    assert torch.allclose(p + g, torch.ones_like(p))
    assert (p > 0).all() and (g > 0).all()
    assert not torch.allclose(p[0], p[1])  # per sample, not per client only
    out = head(f)
    assert torch.allclose(out, head.personal(f * p) + head.generic(f * g))
    # the policy is conditioned on the client's head: another ψ, another split
    with torch.no_grad():
        head.personal.weight.mul_(-1)
    assert not torch.allclose(head.policies(f)[0], p)
    # the same weights give the same predictions (no Gumbel noise outside training)
    assert torch.equal(head(f), head(f))
    head.noise = torch.Generator().manual_seed(3)  # training: Gumbel-softmax, reproducible
    drawn = head(f)
    assert not torch.equal(drawn, head(f))
    head.noise = torch.Generator().manual_seed(3)
    assert torch.equal(drawn, head(f))


def test_mmd_is_zero_for_the_same_rows_and_grows_with_a_shift():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    assert float(mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd(x, x + 3.0)) > float(mmd(x, x + 0.5)) > 0


def test_fedcp_freezes_the_global_head_proposes_the_mean_and_serves_its_own_head(tmp_path):
    settings = {
        "algorithm.method": "fedcp",
        "training.local_epochs": 3,
        "tracking.register_model": "false",
    }
    cfg = load_config(None, tiny_overrides(tmp_path, **settings))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    fed = Federation.from_config(cfg, manifest, ClientStore(tmp_path / "store"))
    start = fed.initial_state()
    model = fed.new_model()
    head: FedCPHead = model.heads["label"]
    assign(head, start.global_heads["label"])
    assert torch.equal(flat(head.personal), flat(head.generic))  # the server's: ψ ≡ φ
    generic0 = flat(head.generic).clone()

    client = manifest.client_ids[0]
    update = fed.client_round(client, start)
    own = fed.store.load(client, at_most=1)
    assert own is not None and float(update.delta_base.norm()) > 0
    proposed = start.global_heads["label"] + update.delta_heads["label"]
    assign(head, proposed)
    assert torch.allclose(flat(head.generic), 0.5 * own.heads["label"] + 0.5 * generic0)
    assert torch.equal(flat(head.personal), flat(head.generic))
    assert not torch.allclose(own.heads["label"], generic0)  # ψ_c trained, φ was frozen

    state, _, history = run_rounds(fed, manifest.client_ids, 4, state=start)
    own = fed.store.load(client, at_most=state.round)
    ctx = fed.context(client, state.round, "evaluate")
    base, heads, _ = fed.algorithm.personalized(ctx, state, fed.data(client), "all", own)
    assert torch.equal(base, state.base)
    assign(head, heads["label"])
    assert torch.equal(flat(head.personal), own.heads["label"])  # the client's own ψ_c
    server: FedCPHead = fed.new_model().heads["label"]
    assign(server, state.global_heads["label"])
    assert torch.equal(flat(server.generic), flat(head.generic))  # the server's φ
    assert torch.equal(flat(server.cpn), flat(head.cpn))  # and policy network
    assert history[-1]["personal/accuracy/mean"] > history[-1]["global/accuracy/mean"]
    assert history[-1]["personal/accuracy/mean"] > 0.5
