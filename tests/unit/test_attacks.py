"""Membership-inference attacks: loss threshold, LiRA (offline/online), shadow statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from fedmtl.privacy.attacks import (
    AttackResult,
    evaluate_scores,
    lira_offline,
    lira_online,
    logit_confidence,
    loss_threshold_attack,
    per_example_loss,
    shadow_statistics,
    split_in_out,
    tpr_at_fpr,
)

N_FEATURES = 64
N_CLASSES = 4


class DictModel(nn.Module):
    """A stand-in for fedmtl's MultiTaskModel: returns {task: logits}."""

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.heads.items()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids spin-waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def overfit_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 200) -> nn.Module:
    """A small MLP trained full-batch until it memorises (x, y) (random labels: memorisation)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


# --- metrics -----------------------------------------------------------------------------------


def test_separated_losses_give_auc_near_one():
    rng = np.random.default_rng(0)
    result = loss_threshold_attack(rng.exponential(0.05, 500), 2.0 + rng.exponential(0.5, 500))
    assert isinstance(result, AttackResult)
    assert result.auc > 0.99
    assert result.advantage > 0.95
    assert result.tpr_at_1pct_fpr > 0.9
    assert (result.n_members, result.n_nonmembers, result.name) == (500, 500, "loss_threshold")


def test_identical_distributions_give_auc_near_half():
    rng = np.random.default_rng(1)
    result = loss_threshold_attack(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000))
    assert result.auc == pytest.approx(0.5, abs=0.03)
    assert result.advantage < 0.08
    assert result.tpr_at_1pct_fpr < 0.05


def test_auc_matches_hand_count_and_sklearn():
    members = np.array([0.1, 0.4, 0.35, 0.9])
    nonmembers = np.array([0.8, 0.3, 1.2])
    # pairs (member, non-member) where the member's loss is lower; ties would count 1/2
    wins = sum(float(m < n) + 0.5 * float(m == n) for m in members for n in nonmembers)
    result = loss_threshold_attack(members, nonmembers)
    assert result.auc == pytest.approx(wins / 12)  # 8/12
    labels = np.r_[np.ones(4), np.zeros(3)]
    assert result.auc == pytest.approx(roc_auc_score(labels, -np.r_[members, nonmembers]))
    # best threshold: loss <= 0.4 flags 3/4 members and 1/3 non-members -> 3/4 - 1/3
    assert result.advantage == pytest.approx(3 / 4 - 1 / 3)


def test_tpr_at_low_fpr_in_unit_interval_and_monotone():
    rng = np.random.default_rng(2)
    scores = np.r_[rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 3000)]
    mask = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    tprs = [tpr_at_fpr(scores, mask, a) for a in (0.0, 0.0005, 0.001, 0.01, 0.1, 0.5, 1.0)]
    assert all(0.0 <= t <= 1.0 for t in tprs)
    assert tprs == sorted(tprs)
    assert tprs[-1] == 1.0
    result = evaluate_scores(scores, mask, "gauss")
    assert 0.0 <= result.tpr_at_01pct_fpr <= result.tpr_at_1pct_fpr <= 1.0
    assert result.tpr_at_1pct_fpr == tprs[3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.auc = 0.0  # type: ignore[misc]


# --- model queries -----------------------------------------------------------------------------


def test_per_example_loss_and_logit_confidence_on_dict_model():
    torch.manual_seed(0)
    model = DictModel({"a": nn.Linear(N_FEATURES, N_CLASSES), "b": nn.Linear(N_FEATURES, 3)})
    model.train()
    x, y = random_data(10, seed=3)
    losses = per_example_loss(model, x, y, task="a", batch_size=3)
    expected = F.cross_entropy(model(x)["a"], y, reduction="none").detach().numpy()
    assert losses.shape == (10,)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    p = np.exp(-expected)  # probability of the true class
    np.testing.assert_allclose(
        logit_confidence(model, x, y, task="a"), np.log(p / (1 - p)), rtol=1e-4
    )
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="pass task="):
        per_example_loss(model, x, y)
    with pytest.raises(ValueError, match="'c' is not among"):
        per_example_loss(model, x, y, task="c")
    single = DictModel({"only": model.heads["a"]})
    np.testing.assert_allclose(per_example_loss(single, x, y), expected, rtol=1e-5)


def test_logit_confidence_is_finite_for_saturated_logits():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1000.0, 0.0], [0.0, 1000.0]]))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    phi = logit_confidence(model, x, torch.tensor([0, 1]))
    np.testing.assert_allclose(phi, [1000.0, -1000.0])


def test_overfitted_mlp_leaks_membership():
    x_in, y_in = random_data(20, seed=10)
    x_out, y_out = random_data(200, seed=11)
    model = overfit_mlp(x_in, y_in, seed=0)
    member_losses = per_example_loss(model, x_in, y_in)
    assert member_losses.max() < 0.05  # memorised
    result = loss_threshold_attack(member_losses, per_example_loss(model, x_out, y_out))
    assert result.auc > 0.9
    assert result.advantage > 0.5


# --- LiRA --------------------------------------------------------------------------------------


def gaussian_lira_setting(n: int, k: int, mean_spread: float, shift: float, seed: int):
    """Per-example OUT means μ_i ~ N(0, spread²), noise 1; members' targets shifted up by
    ``shift``."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, mean_spread, n)
    members = rng.random(n) < 0.5
    out = mu[:, None] + rng.normal(0.0, 1.0, (n, k))
    inn = mu[:, None] + shift + rng.normal(0.0, 1.0, (n, k))
    target = mu + rng.normal(0.0, 1.0, n) + shift * members
    return target, inn, out, members


def test_lira_offline_beats_chance():
    target, _, out, members = gaussian_lira_setting(1000, 16, mean_spread=0.5, shift=2.0, seed=4)
    result = lira_offline(target, out, members)
    assert result.name == "lira_offline"
    assert result.auc > 0.8
    assert lira_offline(target, out, members, variance="per_example").auc > 0.8


def test_lira_offline_beats_global_threshold_when_examples_differ():
    target, _, out, members = gaussian_lira_setting(1000, 16, mean_spread=4.0, shift=2.0, seed=5)
    lira = lira_offline(target, out, members)
    # the global attack on the same statistic: a high confidence (a low loss) means "member"
    global_ = loss_threshold_attack(-target[members], -target[~members])
    assert global_.auc < 0.7
    assert lira.auc > 0.85
    assert lira.auc > global_.auc + 0.15


def test_lira_online_beats_chance_with_ragged_shadows():
    target, inn, out, members = gaussian_lira_setting(1000, 8, mean_spread=4.0, shift=2.0, seed=6)
    rng = np.random.default_rng(7)
    # ragged: not every example has every shadow (column 0 always present, so no row is all NaN)
    inn[:, 1:][rng.random((1000, 7)) < 0.3] = np.nan
    out[:, 1:][rng.random((1000, 7)) < 0.3] = np.nan
    assert np.isnan(out).any() and np.isnan(inn).any()
    result = lira_online(target, inn, out, members)
    assert result.name == "lira_online"
    assert result.auc > 0.75


def test_shadow_statistics_each_example_in_half_the_shadows_and_lira_end_to_end():
    pool_x, pool_y = random_data(60, seed=20)
    seen: list[np.ndarray] = []

    def train_fn(indices: np.ndarray) -> nn.Module:
        seen.append(indices)
        return DictModel(
            {"t": overfit_mlp(pool_x[indices], pool_y[indices], seed=len(seen), steps=120)}
        )

    conf, in_mask = shadow_statistics(
        train_fn, pool_x, pool_y, n_shadows=8, rng=np.random.default_rng(0), task="t"
    )
    assert conf.shape == in_mask.shape == (60, 8)
    assert np.all(np.isfinite(conf))
    assert np.all(in_mask.sum(axis=1) == 4)  # each example IN exactly half of the shadows
    assert all(15 <= idx.size <= 45 for idx in seen)  # each shadow trains on about half the pool
    assert all(np.array_equal(idx, np.flatnonzero(in_mask[:, k])) for k, idx in enumerate(seen))
    _, again = shadow_statistics(
        lambda idx: DictModel({"t": nn.Linear(N_FEATURES, N_CLASSES)}),
        pool_x,
        pool_y,
        8,
        rng=0,
        task="t",
    )
    np.testing.assert_array_equal(again, in_mask)  # reproducible from the seed
    # the shadows' own IN/OUT confidences: IN clearly higher (memorised)
    in_conf, out_conf = split_in_out(conf, in_mask)
    assert np.nanmean(in_conf) > np.nanmean(out_conf) + 2.0
    # attack a fresh target trained on a random half of the pool
    members = np.random.default_rng(1).random(60) < 0.5
    target = DictModel({"t": overfit_mlp(pool_x[members], pool_y[members], seed=99, steps=120)})
    target_conf = logit_confidence(target, pool_x, pool_y, task="t")
    assert lira_offline(target_conf, out_conf, members).auc > 0.75
    assert lira_online(target_conf, in_conf, out_conf, members).auc > 0.75


# --- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    ok = np.array([0.1, 0.2])
    with pytest.raises(ValueError, match="member_losses is empty"):
        loss_threshold_attack(np.array([]), ok)
    with pytest.raises(ValueError, match="nonmember_losses is empty"):
        loss_threshold_attack(ok, [])
    with pytest.raises(ValueError, match="NaN or infinite"):
        loss_threshold_attack(np.array([0.1, np.nan]), ok)
    with pytest.raises(ValueError, match="one-dimensional"):
        loss_threshold_attack(np.ones((2, 2)), ok)
    target = np.array([0.0, 1.0, 2.0])
    out = np.zeros((3, 4)) + np.arange(4)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        lira_offline(target, out, np.array([True, False]))
    with pytest.raises(ValueError, match=r"shape \(3, K\)"):
        lira_offline(target, out[:2], np.array([True, False, True]))
    with pytest.raises(ValueError, match="no members"):
        lira_offline(target, out, np.zeros(3, bool))
    with pytest.raises(ValueError, match="no non-members"):
        lira_offline(target, out, np.ones(3, bool))
    with pytest.raises(ValueError, match="no members"):
        evaluate_scores(target, np.zeros(3, bool), "x")
    with pytest.raises(ValueError, match="variance must be"):
        lira_offline(target, out, np.array([True, False, True]), variance="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 2 shadow statistics per example"):
        lira_offline(target, out[:, :1], np.array([True, False, True]), variance="per_example")
    with pytest.raises(ValueError, match="no shadow statistic"):
        lira_offline(target, np.full((3, 4), np.nan), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="no shadow models"):
        lira_online(target, np.zeros((3, 0)), out, np.array([True, False, True]))
    with pytest.raises(ValueError, match="max_fpr"):
        tpr_at_fpr(target, np.array([True, False, True]), 1.5)
    x, y = random_data(4, seed=0)
    with pytest.raises(ValueError, match="4 rows but y has 3"):
        per_example_loss(nn.Linear(N_FEATURES, N_CLASSES), x, y[:3])
    with pytest.raises(ValueError, match="x is empty"):
        per_example_loss(nn.Linear(N_FEATURES, N_CLASSES), x[:0], y[:0])
    with pytest.raises(ValueError, match="labels must lie in"):
        per_example_loss(nn.Linear(N_FEATURES, 2), x, y + 2)
    with pytest.raises(ValueError, match="n_shadows must be >= 2"):
        shadow_statistics(lambda idx: nn.Linear(N_FEATURES, N_CLASSES), x, y, n_shadows=1, rng=0)
    with pytest.raises(ValueError, match="same shape"):
        split_in_out(np.zeros((3, 2)), np.zeros((3, 3), bool))
