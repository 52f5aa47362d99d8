"""Sample-level DP-SGD inside local training (fedmtl/privacy/dpsgd.py): Opacus's clipping and noise,
the same batches as plain SGD when both are switched off, each client's ε equal to Opacus's
own accountant, the settings' errors, and the core round with a ledger that survives resume."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("opacus")

from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

from fedmtl.client.batched import BatchingUnsupported  # noqa: E402
from fedmtl.client.store import ClientStore  # noqa: E402
from fedmtl.client.training import LocalConfig, fit, multitask_loss  # noqa: E402
from fedmtl.config import ConfigError, DPSGDConfig, load_config  # noqa: E402
from fedmtl.data import partition, prepare  # noqa: E402
from fedmtl.data.manifest import TaskSpec, read_manifest  # noqa: E402
from fedmtl.federation import Federation  # noqa: E402
from fedmtl.privacy.dpsgd import (
    dp_fit,  # noqa: E402
    epsilon,
    poisson_plan,
)
from fedmtl.privacy.sample_level import EPSILON_KEY, LEDGER, DPSGDBudgetSpent, Ledger  # noqa: E402
from fedmtl.rounds import run_rounds
from fedmtl.state import FailureKind
from tests.conftest import tiny_overrides  # noqa: E402

TASKS = [TaskSpec("label", "classification", ["a", "b", "c"])]


class Net(nn.Module):
    """A small multi-task-shaped model: a dict of outputs, as fedmtl's models return."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"label": self.head(self.body(x))}


def data(n: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) * scale
    y = {"label": torch.randint(0, 3, (n,), generator=g)}
    return x, y


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def row_grads(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's gradient of the loss, by plain autograd one row at a time ([n, P])."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        multitask_loss(
            model(x[i : i + 1]), {k: v[i : i + 1] for k, v in y.items()}, TASKS
        ).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(out)


# clipping and noise ---------------------------------------------------------------------------


def test_each_rows_contribution_is_clipped_to_the_max_grad_norm():
    """One row per step (n = 1, q = 1), no noise, lr 1: the step is minus that row's clipped
    gradient, so its norm is at most C, exactly C for a row whose own gradient is longer."""
    x, y = data(12, scale=20.0)  # large inputs: most raw row gradients are far above C
    grads = row_grads(net(), x, y)
    clip = 5.0
    assert (grads.norm(dim=1) > clip).sum() >= 8 and (grads.norm(dim=1) < clip).any()
    cfg = LocalConfig(batch_size=1, lr=1.0)
    for i in range(x.shape[0]):
        model = net()
        before = flat_params(model)
        dp_fit(
            model,
            list(model.parameters()),
            x[i : i + 1],
            {"label": y["label"][i : i + 1]},
            TASKS,
            1,
            cfg,
            torch.Generator().manual_seed(i),
            spec(noise_multiplier=0.0, max_grad_norm=clip),
        )
        step = before - flat_params(model)
        raw = grads[i].norm()
        assert step.norm() <= clip * (1 + 1e-5)
        assert step.norm() == pytest.approx(min(float(raw), clip), rel=1e-4)
        assert torch.allclose(step, grads[i] * min(1.0, clip / float(raw)), atol=1e-4)


def test_a_batch_step_is_the_sum_of_clipped_row_gradients_over_the_expected_batch():
    """q = 1 (B >= n): every row in the one step; Δ = −lr·Σ_i clip_C(g_i)/n, with the row
    gradients computed independently of Opacus; Opacus's grad_sample agrees with them."""
    x, y = data(6, seed=1, scale=3.0)
    model = net(1)
    grads = row_grads(model, x, y)
    clip = 1.0
    clipped = grads * (clip / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    before = flat_params(model)
    cfg = LocalConfig(batch_size=8, lr=0.3)
    dp_fit(
        model,
        list(model.parameters()),
        x,
        y,
        TASKS,
        1,
        cfg,
        torch.Generator().manual_seed(0),
        spec(noise_multiplier=0.0, max_grad_norm=clip),
    )
    assert torch.allclose(before - flat_params(model), 0.3 * clipped.sum(0) / 6, atol=1e-6)
    assert (clipped.norm(dim=1) <= clip + 1e-5).all() and (grads.norm(dim=1) > clip).any()

    from opacus import GradSampleModule

    probe = net(1)
    gsm = GradSampleModule(probe)
    multitask_loss(gsm(x), y, TASKS).backward()
    sample = torch.cat([p.grad_sample.reshape(6, -1) for p in probe.parameters()], dim=1)
    assert torch.allclose(sample, grads, atol=1e-5)
    gsm.cleanup()


def test_noise_has_std_sigma_c_over_the_expected_batch():
    """q = 1: every seed takes the same clipped gradient step, so the steps' spread across seeds
    is the noise's, σ·C/⌊nq⌋ per coordinate (lr 1)."""
    x, y = data(4, seed=2)
    cfg = LocalConfig(batch_size=4, lr=1.0)
    steps = []
    for seed in range(200):
        model = net()
        before = flat_params(model)
        dp_fit(
            model,
            list(model.parameters()),
            x,
            y,
            TASKS,
            1,
            cfg,
            torch.Generator().manual_seed(seed),
            spec(noise_multiplier=2.0, max_grad_norm=0.5),
        )
        steps.append(before - flat_params(model))
    spread = torch.stack(steps).std(0)
    assert spread.mean() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_only_the_given_parameters_train_and_the_module_is_left_as_it_was_found():
    model = net()
    x, y = data(10)
    body = [p.detach().clone() for p in model.body.parameters()]
    head = flat_params(model.head)
    dp_fit(
        model,
        list(model.head.parameters()),
        x,
        y,
        TASKS,
        2,
        LocalConfig(batch_size=4),
        torch.Generator().manual_seed(0),
        spec(),
    )
    assert all(torch.equal(a, b) for a, b in zip(body, model.body.parameters()))
    assert not torch.equal(head, flat_params(model.head))
    for p in model.parameters():
        assert p.requires_grad
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter"))
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not hasattr(m, "activations")


# the same as plain SGD when clipping and noise are off ----------------------------------------


def test_without_noise_or_clipping_a_full_batch_equals_plain_sgd():
    x, y = data(20, seed=3)
    cfg = LocalConfig(batch_size=32, lr=0.2, momentum=0.5, weight_decay=1e-3)
    a, b = net(), net()
    plain = fit(a, list(a.parameters()), x, y, TASKS, 3, cfg, torch.Generator().manual_seed(0))
    private = dp_fit(
        b,
        list(b.parameters()),
        x,
        y,
        TASKS,
        3,
        cfg,
        torch.Generator().manual_seed(0),
        spec(noise_multiplier=0.0, max_grad_norm=1e9),
    )
    assert torch.allclose(flat_params(a), flat_params(b), atol=1e-6)
    assert private == pytest.approx(plain, rel=1e-5)


def test_without_noise_or_clipping_poisson_batches_equal_plain_sgd_on_the_same_batches():
    """Opacus's Poisson batches from the client's generator, replayed by hand: the same steps
    with the loss summed over the batch and divided by the expected batch size ⌊nq⌋."""
    n, batch = 37, 8
    x, y = data(n, seed=4)
    cfg = LocalConfig(batch_size=batch, lr=0.1)
    b = net()
    dp_fit(
        b,
        list(b.parameters()),
        x,
        y,
        TASKS,
        2,
        cfg,
        torch.Generator().manual_seed(5),
        spec(noise_multiplier=0.0, max_grad_norm=1e9),
    )
    rate, per_epoch, expected = poisson_plan(n, batch)
    a = net()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    sizes = []
    for _ in range(2):
        for idx in UniformWithReplacementSampler(
            num_samples=n, sample_rate=rate, generator=g, steps=per_epoch
        ):
            opt.zero_grad()
            sizes.append(len(idx))
            if idx:
                out = a(x[idx])["label"]
                (F.cross_entropy(out, y["label"][idx], reduction="sum") / expected).backward()
                opt.step()
    assert len(set(sizes)) > 1  # the batches really are Poisson
    assert torch.allclose(flat_params(a), flat_params(b), atol=1e-6)


def test_poisson_plan_is_opacus_dataloaders():
    for n, batch in [(37, 8), (100, 16), (5, 16), (16, 16)]:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.zeros(n, 1)), batch_size=batch
        )
        dp = DPDataLoader.from_data_loader(loader)
        rate, steps, expected = poisson_plan(n, batch)
        assert rate == dp.sample_rate and steps == len(dp)
        assert expected == max(int(n * dp.sample_rate), 1)


# accounting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("noise,rate,steps", [(1.0, 0.1, 30), (0.7, 1 / 11, 110), (2.0, 1.0, 5)])
def test_epsilon_is_opacus_rdp_accountants(noise, rate, steps):
    ours = epsilon([(noise, rate, steps // 2), (noise, rate, steps - steps // 2)], 1e-5)
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    assert ours == acc.get_epsilon(delta=1e-5)


def test_epsilon_with_the_prv_accountant_is_opacus_prv():
    ours = epsilon([(1.0, 0.1, 40)], 1e-5, "prv")
    acc = PRVAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours < epsilon([(1.0, 0.1, 40)], 1e-5, "rdp")


def test_epsilon_without_steps_is_zero_and_without_noise_infinite():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(0.0, 0.5, 3)], 1e-5) == math.inf


def test_the_ledger_round_trips_and_predicts_the_next_round():
    ledger = Ledger().plus(1, [(1.0, 0.1, 10), (1.0, 0.1, 10)]).plus(3, [(1.0, 0.1, 20)])
    back = Ledger.from_tensor(ledger.to_tensor())
    assert back.rows == [(1, 1.0, 0.1, 20), (3, 1.0, 0.1, 20)]
    assert back.last_round() == [(1.0, 0.1, 20)]
    with pytest.raises(ValueError, match="ledger"):
        Ledger.from_tensor(torch.zeros(3))


# settings -------------------------------------------------------------------------------------


def spec(**settings) -> DPSGDConfig:
    """DP-SGD's settings as the federation hands them to a client; unvalidated, so that the
    clip-only ablation (σ = 0, below what the settings allow a user) can be built."""
    return DPSGDConfig.model_construct(**{"enabled": True, **settings})


@pytest.mark.parametrize(
    "old,new,value",
    [
        ("dp_sgd", "dp_sgd.enabled", True),
        ("dp_sgd_noise_multiplier", "dp_sgd.noise_multiplier", 2.0),
        ("dp_sgd_max_grad_norm", "dp_sgd.max_grad_norm", 0.5),
        ("dp_sgd_delta", "dp_sgd.delta", 1e-7),
        ("dp_sgd_target_epsilon", "dp_sgd.target_epsilon", 3.0),
        ("dp_sgd_accountant", "dp_sgd.accountant", "prv"),
    ],
)
def test_old_flat_keys_still_work_and_name_their_new_key(old, new, value, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        f"privacy:\n  dp_sgd: true\n  {old}: {value}\n"
        if old != "dp_sgd"
        else "privacy:\n  dp_sgd: true\n"
    )
    for read in (
        lambda: load_config(params),
        lambda: load_config(None, ["privacy.dp_sgd=true", f"privacy.{old}={value}"]),
    ):
        with pytest.warns(FutureWarning, match=rf"privacy\.{old} is now privacy\.{re.escape(new)}"):
            cfg = read()
        section, key = new.split(".")
        assert getattr(getattr(cfg.privacy, section), key) == value
    if old != "dp_sgd":
        with pytest.raises(
            ConfigError, match=rf"privacy\.{old} and privacy\.{re.escape(new)} are both set"
        ):
            params.write_text(
                "privacy:\n"
                f"  dp_sgd: {{enabled: true, {new.split('.')[1]}: {value}}}\n"
                f"  {old}: {value}\n"
            )
            load_config(params)


@pytest.mark.parametrize(
    "override,message",
    [
        ("privacy.dp_sgd.noise_multiplier=0", "privacy.dp_sgd.noise_multiplier"),
        ("privacy.dp_sgd.max_grad_norm=-1", "privacy.dp_sgd.max_grad_norm"),
        ("privacy.dp_sgd.delta=2", "privacy.dp_sgd.delta"),
        ("privacy.dp_sgd.accountant=moments", "privacy.dp_sgd.accountant.*allowed values"),
        ("training.batched=on", "training.batched=on with privacy.dp_sgd.*per-sample gradients"),
        ("algorithm.method=pfedme", "algorithm.method=pfedme with privacy.dp_sgd.enabled"),
        ("algorithm.method=ifca", "algorithm.method=ifca with privacy.dp_sgd.enabled"),
        *(
            (f"algorithm.method={m}", f"algorithm.method={m} with privacy.dp_sgd.enabled")
            for m in ("fedala", "feddbe", "gpfl", "fedem")
        ),
        ("grouping.method=cluster", "grouping.method=cluster with privacy.dp_sgd.enabled"),
    ],
)
def test_bad_config_settings_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.dp_sgd.enabled=true", override])


def test_config_defaults_and_mechanism():
    p = load_config(None, ["privacy.dp_sgd.enabled=true", "privacy.dp_fedavg.delta=1e-6"]).privacy
    assert p.mechanism == "dp-sgd" and p.dp_sgd_delta == 1e-6 and not p.per_client_metrics
    assert (
        not p.enabled and p.active
    )  # no release rule of its own; per-client metrics off by default
    both = load_config(
        None,
        [
            "privacy.dp_sgd.enabled=true",
            "privacy.dp_fedavg.enabled=true",
            "privacy.secure_sum.enabled=true",
        ],
    )
    assert both.privacy.mechanism == "dp-fedavg+dp-sgd+secagg"
    assert (
        load_config(
            None, ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.delta=1e-7"]
        ).privacy.dp_sgd_delta
        == 1e-7
    )


# the core round -------------------------------------------------------------------------------

PRIVATE = {
    "privacy.dp_sgd.enabled": True,
    "privacy.dp_sgd.noise_multiplier": 1.2,
    "privacy.dp_sgd.max_grad_norm": 1.0,
    "data.partition.n_clients": 6,
    "training.batch_size": 32,
    "algorithm.personal_fit": "sgd",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpsgd")
    cfg = load_config(None, tiny_overrides(root, **PRIVATE))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def make(store: str, secret=None, **extra) -> Federation:
        c = load_config(None, tiny_overrides(root, **PRIVATE, **extra))
        return Federation.from_config(c, manifest, ClientStore(root / store), secret)

    return make, manifest


def test_run_rounds_logs_growing_client_epsilon_equal_to_opacus(tiny):
    make, manifest = tiny
    fed = make("grow")
    clients = manifest.client_ids
    state, _, history = run_rounds(fed, clients, 3)
    eps = [h["privacy/dp_sgd_epsilon_max"] for h in history]
    assert eps[0] < eps[1] < eps[2]
    assert all(
        h["privacy/dp_sgd_clients"] == len(clients) and h["privacy/dp_sgd_sat_out"] == 0
        for h in history
    )
    assert history[-1]["privacy/dp_sgd_epsilon_mean"] <= eps[-1]
    table = state.privacy[EPSILON_KEY]
    want = {}
    for i, client in enumerate(clients):  # each client's ε: Opacus's accountant over its own steps
        rate, per_epoch, _ = poisson_plan(fed.manifest_rows(client), 32)
        if rate not in want:
            acc = RDPAccountant()
            for _ in range(3 * per_epoch):  # 3 rounds of local_epochs = 1
                acc.step(noise_multiplier=1.2, sample_rate=rate)
            want[rate] = acc.get_epsilon(delta=1e-5)
        assert float(table[i]) == want[rate]
        ledger = Ledger.from_tensor(fed.store.load_record(client, LEDGER))
        assert [r[0] for r in ledger.rows] == [1, 2, 3]
    assert eps[-1] == pytest.approx(float(table.max()))


def test_dp_sgd_noise_comes_from_the_secret_key_not_the_seed(tiny):
    """The attack: rebuild a run's DP-SGD noise from its logged seed. Two runs with the same
    training.seed but their own keys differ; only the same key (a resume) repeats the model."""
    from fedmtl.privacy.randomness import SecretRandom

    make, manifest = tiny
    key = SecretRandom.fresh()
    a, _, _ = run_rounds(make("seed-a", key), manifest.client_ids, 1)
    b, _, _ = run_rounds(make("seed-b", SecretRandom(key.key)), manifest.client_ids, 1)
    c, _, _ = run_rounds(make("seed-c"), manifest.client_ids, 1)  # same seed, a fresh key
    assert torch.equal(a.base, b.base)
    assert not torch.allclose(a.base, c.base)
    seeded = [
        run_rounds(
            make(f"seeded-{i}", **{"privacy.insecure_seeded_noise": True}), manifest.client_ids, 1
        )[0]
        for i in range(2)
    ]  # the test-only setting: replayable from the seed, ε void
    assert torch.equal(seeded[0].base, seeded[1].base)


def test_resume_reads_the_ledger_of_the_checkpointed_round(tiny):
    """Two rounds, then a third from the saved state, against three straight: same ε, same model;
    a ledger written by a round after the checkpoint is not read."""
    make, manifest = tiny
    clients = manifest.client_ids
    from fedmtl.privacy.randomness import SecretRandom

    key = SecretRandom.fresh()  # what the run's directory keeps for a resume
    straight, _, _ = run_rounds(make("straight", key), clients, 3, evaluate_every=3)
    first = make("resumed", key)
    two, _, _ = run_rounds(first, clients, 2, evaluate_every=2)
    first.train_clients(clients, two)  # an interrupted third round that wrote its ledgers
    resumed, _, _ = run_rounds(make("resumed", key), clients, 1, state=two)  # resumed from round 2
    assert torch.equal(straight.privacy[EPSILON_KEY], resumed.privacy[EPSILON_KEY])
    assert torch.equal(straight.base, resumed.base)


def test_batched_on_is_refused_naming_dp_sgd(tiny):
    make, _ = tiny
    fed = make("batched")
    assert fed.uses_batching() is False  # auto: the per-client path
    on = Federation(
        fed.partitions_dir,
        fed.manifest,
        fed.model_cfg,
        fed.local,
        fed.store,
        batched="on",
        privacy=fed.privacy,
    )
    with pytest.raises(
        BatchingUnsupported, match="training.batched is 'on' but privacy.dp_sgd.enabled: DP-SGD"
    ):
        on.uses_batching()
    with pytest.raises(ValueError, match="algorithm.method=pfedme"):
        from fedmtl.algorithms import get_algorithm

        Federation(
            fed.partitions_dir,
            fed.manifest,
            fed.model_cfg,
            fed.local,
            fed.store,
            algorithm=get_algorithm("pfedme"),
            privacy=fed.privacy,
        )


def test_a_client_over_its_target_sits_out_named(tiny):
    """A target between the clients' ε after two rounds (224-row clients take 7 steps at q = 1/7,
    225-row ones 8 at 1/8): in round 2 the clients it would take over sit out, each named; in
    round 3 every client would, so training stops. No client's ε ever exceeds the target."""
    make, manifest = tiny
    clients = manifest.client_ids
    probe = make("probe")
    plans = {c: poisson_plan(probe.manifest_rows(c), 32)[:2] for c in clients}
    after = {
        k: {c: epsilon([(1.2, q, k * s)], 1e-5) for c, (q, s) in plans.items()} for k in (1, 2, 3)
    }
    low, high = min(after[2].values()), max(after[2].values())
    assert max(after[1].values()) < low < high < min(after[3].values())
    target = (low + high) / 2
    over = sorted(c for c in clients if after[2][c] > target)
    fed = make("target", **{"privacy.dp_sgd.target_epsilon": target})
    one, _, _ = run_rounds(fed, clients, 1)
    failed = {}
    fed.train_clients(clients, one, failed)
    assert sorted(failed) == over
    assert all(f.kind is FailureKind.BUDGET_SPENT and not f.retryable for f in failed.values())
    assert all(
        str(f).startswith("DPSGDBudgetSpent: client '")
        and "privacy.dp_sgd.target_epsilon" in str(f)
        for f in failed.values()
    )
    state, _, history = run_rounds(fed, clients, 2, state=one)
    assert state.round == 2 and len(history) == 1  # round 3: no client could train
    assert history[0]["privacy/dp_sgd_sat_out"] == len(over)
    assert history[0]["privacy/dp_sgd_epsilon_max"] <= target
    assert history[0]["privacy/dp_sgd_epsilon_max"] == pytest.approx(low)
    # a target below one round's ε: the client trains, accounts, and discards; nothing is kept
    below = make("below", **{"privacy.dp_sgd.target_epsilon": min(after[1].values()) / 2})
    with pytest.raises(DPSGDBudgetSpent, match="this round would take its sample-level ε"):
        below.client_round(clients[0], below.initial_state())
    assert (
        below.store.load_record(clients[0], LEDGER) is None and below.store.load(clients[0]) is None
    )
