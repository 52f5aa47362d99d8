"""Each method's defining property on small cases, and the learned-grouping rules."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fedmtl.algorithms import METHODS, get_algorithm
from fedmtl.client.personal import fit_heads_map
from fedmtl.client.store import ClientStore
from fedmtl.client.training import LocalConfig, multitask_loss, train_joint
from fedmtl.config import load_config
from fedmtl.config.sections import NOT_SERVABLE
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run_rounds
from fedmtl.server.grouping import adjusted_rand, choose_group, cluster_vectors
from fedmtl.server.optimizers import ServerOptimizer
from fedmtl.state import assign
from tests.conftest import tiny_overrides, with_settings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("alg")
    cfg = load_config(None, tiny_overrides(root, **{"training.rounds": 3}))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)

    def make(method: str, store: str, **overrides) -> Federation:
        # a method the registered model cannot serve runs with registration off (its setting)
        servable = {"tracking.register_model": method not in NOT_SERVABLE}
        c = with_settings(cfg, {"algorithm.method": method, **servable, **overrides})
        return Federation.from_config(c, manifest, ClientStore(root / store))

    return make, manifest


def one_client(fed: Federation, local: LocalConfig | None = None, method: str | None = None):
    """(context, state, data) for the first client, with optional other local settings."""
    if local is not None or method is not None:
        fed = dataclasses.replace(
            fed,
            local=local or fed.local,
            algorithm=get_algorithm(method) if method else fed.algorithm,
        )
    client = fed.manifest.client_ids[0]
    state = fed.initial_state()
    data = fed.data(client)
    return fed, fed.context(client, 0), state, data


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model(setup):
    make, _ = setup
    fed = make("fedavg", "prox")
    runs = {}
    for mu in (0.0, 10.0):
        f, ctx, state, data = one_client(fed, dataclasses.replace(fed.local, prox_mu=mu))
        runs[mu] = f.algorithm.client_round(ctx, state, data, "all", None)[0]
    plain_fed, ctx, state, data = one_client(fed)
    plain = plain_fed.algorithm.client_round(ctx, state, data, "all", None)[0]
    assert fed.local.prox_mu == 0.0
    assert torch.equal(runs[0.0].delta_base, plain.delta_base)
    assert runs[10.0].delta_base.norm() < 0.8 * runs[0.0].delta_base.norm()


def test_fedrep_trains_the_head_on_a_frozen_base_then_the_base_with_the_head_frozen(setup):
    make, _ = setup
    fed = make("fedrep", "rep")
    # only the head phase: the base must not move, the head must
    f, ctx, state, data = one_client(
        fed, dataclasses.replace(fed.local, epochs=0, personal_epochs=2)
    )
    update, personal = f.algorithm.client_round(ctx, state, data, "all", None)
    assert torch.count_nonzero(update.delta_base) == 0
    assert not torch.equal(personal.heads["label"], state.global_heads["label"])
    assert update.delta_heads == {}  # FedRep never releases a head
    # only the base phase: the head must stay exactly where it started
    f, ctx, state, data = one_client(
        fed, dataclasses.replace(fed.local, epochs=2, personal_epochs=0)
    )
    update, personal = f.algorithm.client_round(ctx, state, data, "all", None)
    assert torch.count_nonzero(update.delta_base) > 0
    assert torch.equal(personal.heads["label"], state.global_heads["label"])


def test_fedper_and_lg_fedavg_release_complementary_parts(setup):
    make, _ = setup
    for method, base_released, heads_released in (
        ("fedper", True, False),
        ("lg-fedavg", False, True),
        ("local", False, False),
        ("fedmtl", True, True),
    ):
        f, ctx, state, data = one_client(make(method, f"rel-{method}"))
        update, _ = f.algorithm.client_round(
            ctx, state, data, "all" if method != "fedmtl" else data.group, None
        )
        assert (update.delta_base is not None) is base_released, method
        assert bool(update.delta_heads) is heads_released, method


def test_ditto_with_huge_lambda_is_the_global_model_and_with_zero_is_not(setup):
    make, _ = setup
    fed = make("ditto", "ditto")
    received = None
    for lam, should_match in ((1e12, True), (0.0, False)):
        f, ctx, state, data = one_client(fed, dataclasses.replace(fed.local, ditto_lambda=lam))
        _, personal = f.algorithm.client_round(ctx, state, data, "all", None)
        received = torch.cat([state.base, state.global_heads["label"]])
        mine = torch.cat([personal.base, personal.heads["label"]])
        assert torch.allclose(mine, received, atol=1e-6) is should_match, lam


def test_pfedme_personal_model_differs_from_the_released_local_model(setup):
    make, _ = setup
    f, ctx, state, data = one_client(make("pfedme", "pfedme"))
    update, personal = f.algorithm.client_round(ctx, state, data, "all", None)
    assert torch.isfinite(update.delta_base).all() and torch.count_nonzero(update.delta_base) > 0
    assert not torch.allclose(personal.base, state.base + update.delta_base)


def test_ifca_rule_picks_the_head_that_generated_the_clients_data(setup):
    make, manifest = setup
    fed = make("ifca", "ifca-rule")
    state = fed.initial_state()
    # plant: train one head per true group on that group's pooled data, from the same base
    by_group: dict[str, list[str]] = {}
    for c in manifest.clients:
        by_group.setdefault(c.group, []).append(c.client)
    planted = {}
    for g, members in sorted(by_group.items()):
        heads = state.global_heads
        for client in members:
            ctx = fed.context(client, 0)
            _, heads, _ = train_joint(
                ctx.model,
                state.base,
                heads,
                fed.data(client),
                ctx.tasks,
                fed.local,
                ctx.generator,
                3,
                train_base=False,
            )
        planted[g] = heads
    state = dataclasses.replace(state, group_heads=planted)
    for c in manifest.clients:
        ctx = fed.context(c.client, 0)
        assert choose_group(ctx.model, state, fed.data(c.client), ctx.tasks) == c.group


def test_cluster_vectors_finds_planted_directions_and_declines_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 40))
    rows = np.concatenate([c + 0.1 * rng.normal(size=(5, 40)) for c in centres])
    labels, score = cluster_vectors(rows, max_groups=6)
    assert (
        adjusted_rand(
            dict(enumerate(map(str, labels))), dict(enumerate(map(str, np.repeat([0, 1, 2], 5))))
        )
        == 1.0
    )
    assert score > 0.5
    flat_labels, _ = cluster_vectors(rng.normal(size=(15, 40)), max_groups=6, min_silhouette=0.3)
    assert set(flat_labels.tolist()) == {0}


def test_cluster_grouping_recovers_the_true_groups_in_the_flowless_loop(setup):
    make, manifest = setup
    fed = make("fedmtl", "cluster", **{"grouping.method": "cluster", "grouping.warmup_rounds": 2})
    state, records, _ = run_rounds(fed, manifest.client_ids, 3)
    assert len(state.group_heads) == 2
    assert adjusted_rand(state.assignment, fed.groups) == 1.0
    assert set(records["assigned_group"]) == set(state.group_heads)


def test_server_optimisers_match_reddi_et_al_by_hand():
    x, d = torch.tensor([1.0, -1.0]), torch.tensor([0.5, -2.0])
    assert torch.equal(
        ServerOptimizer("fedavg", lr=0.5).step("base", x, d, {}),
        x + 0.25 * torch.tensor([1.0, -4.0]),
    )
    for name in ("fedadam", "fedyogi"):
        moments: dict = {}
        opt = ServerOptimizer(name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        out = opt.step("base", x, d, moments)
        m = 0.1 * d
        v0 = torch.full_like(x, 1e-6)
        v = (
            0.99 * v0 + 0.01 * d**2
            if name == "fedadam"
            else v0 - 0.01 * d**2 * torch.sign(v0 - d**2)
        )
        assert torch.allclose(out, x + 0.1 * m / (v.sqrt() + 1e-3))
        assert set(moments) == {"base/m", "base/v"}
    with pytest.raises(ValueError, match="server.optimizer 'sgd'"):
        ServerOptimizer("sgd")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_learns_something_and_is_deterministic(setup, method):
    make, manifest = setup
    # GPFL's personal head first sees nearly constant features (its conditional valve's β
    # dominates the base's output at initialisation, as in PFLlib): 0.12 after 2 rounds here,
    # 0.22 after 4; FedCP's heads each see about half of every feature at first (the policies
    # start near ½): 0.19 after 2 rounds
    rounds = 4 if method in ("gpfl", "fedcp") else 2
    a = run_rounds(make(method, f"det-{method}-a"), manifest.client_ids, rounds)
    b = run_rounds(make(method, f"det-{method}-b"), manifest.client_ids, rounds)
    assert torch.equal(a[0].base, b[0].base)
    acc = a[2][-1]["personal/accuracy/mean"]
    assert acc > 0.2, f"{method}: personalised accuracy {acc:.3f} is no better than chance"


def test_fedmtl_personal_map_fit_is_exact_and_shrinks_to_the_group_head(setup):
    make, _ = setup
    fed, ctx, state, data = one_client(make("fedmtl", "map"))
    prior = state.heads_for(data.group)
    pinned, _ = fit_heads_map(ctx.model, state.base, prior, data, ctx.tasks, lam=1e9)
    assert torch.allclose(pinned["label"], prior["label"], atol=1e-4)
    free, loss = fit_heads_map(ctx.model, state.base, prior, data, ctx.tasks, lam=0.3)
    again, _ = fit_heads_map(ctx.model, state.base, prior, data, ctx.tasks, lam=0.3)
    assert torch.equal(free["label"], again["label"])
    # at the optimum the objective's gradient vanishes
    head = ctx.model.heads["label"]
    assign(head, free["label"])
    with torch.no_grad():
        ctx.model.base.eval()
        z = ctx.model.base(data.x_train)
    params = list(head.parameters())
    objective = multitask_loss(
        {"label": head(z)}, data.y_train, ctx.tasks
    ) + 0.5 * 0.3 / data.n_train * sum(
        ((p - a) ** 2).sum() for p, a in zip(params, _split(head, prior["label"]))
    )
    grads = torch.autograd.grad(objective, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-3
    assert (
        loss
        < multitask_loss({"label": _with(head, prior["label"])(z)}, data.y_train, ctx.tasks).item()
    )


def _split(module, vector):
    out, offset = [], 0
    for p in module.parameters():
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _with(module, vector):
    clone = copy.deepcopy(module)
    assign(clone, vector)
    return clone


def _client_like(data, x_train, y_train, x_test=None):
    from fedmtl.client.data import ClientData

    return ClientData(
        data.client,
        data.group,
        x_train,
        y_train,
        data.x_test if x_test is None else x_test,
        data.y_test,
    )


def test_fedmtl_personal_lambda_search_trusts_the_group_head_only_when_the_data_agrees(setup):
    """personal_lambda_search: cv picks a large λ when the client's labels are drawn from its
    group head, a small one when they follow a very different head; it reads only the train rows
    and is deterministic."""
    from fedmtl.client.personal import LAMBDA_GRID, fit_personal_heads, select_lambda

    make, _ = setup
    fed, ctx, state, data = one_client(make("fedmtl", "lambda-search"))
    head = ctx.model.heads["label"]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, data.x_train.shape[1], generator=gen)
    prior = {
        "label": state.heads_for(data.group)["label"] * 0
        + torch.randn(state.heads_for(data.group)["label"].shape, generator=gen)
    }
    with torch.no_grad():
        assign(ctx.model.base, state.base)
        ctx.model.base.eval()
        z = ctx.model.base(x)
        assign(head, prior["label"])
        near = torch.multinomial(torch.softmax(head(z), 1), 1, generator=gen).squeeze(1)
        assign(head, -3 * prior["label"])  # another head: its scores reverse the prior's
        far = torch.multinomial(torch.softmax(head(z), 1), 1, generator=gen).squeeze(1)

    lam_near, scores = select_lambda(
        ctx.model, state.base, prior, _client_like(data, x, {"label": near}), ctx.tasks
    )
    lam_far, _ = select_lambda(
        ctx.model, state.base, prior, _client_like(data, x, {"label": far}), ctx.tasks
    )
    assert len(scores) == len(LAMBDA_GRID)
    assert lam_near >= 3, f"labels drawn from the group head: λ {lam_near} (scores {scores})"
    assert lam_far <= 0.3, f"labels far from the group head: λ {lam_far}"

    # the held-out split is never read: NaN test rows change nothing; and it is deterministic
    client = _client_like(data, x, {"label": far})
    poisoned = _client_like(
        data, x, {"label": far}, x_test=torch.full_like(data.x_test, float("nan"))
    )
    a, _, lam_a = fit_personal_heads(ctx.model, state.base, prior, client, ctx.tasks, 0.3, "cv")
    b, _, lam_b = fit_personal_heads(ctx.model, state.base, prior, poisoned, ctx.tasks, 0.3, "cv")
    assert lam_a == lam_b == lam_far and torch.equal(a["label"], b["label"])

    # search off is the fixed-λ MAP fit; too few rows to cross-validate keep the fixed λ
    fixed, _, lam = fit_personal_heads(ctx.model, state.base, prior, client, ctx.tasks, 0.3, "off")
    ref, _ = fit_heads_map(ctx.model, state.base, prior, client, ctx.tasks, 0.3)
    assert lam == 0.3 and torch.equal(fixed["label"], ref["label"])
    few = _client_like(data, x[:9], {"label": far[:9]})
    assert select_lambda(ctx.model, state.base, prior, few, ctx.tasks)[0] is None
    assert fit_personal_heads(ctx.model, state.base, prior, few, ctx.tasks, 0.3, "cv")[2] == 0.3


def test_a_method_the_registered_model_cannot_serve_needs_registration_off():
    for method in NOT_SERVABLE:
        with pytest.raises(ValueError, match="tracking.register_model=false"):
            load_config(None, [f"algorithm.method={method}"])
        load_config(None, [f"algorithm.method={method}", "tracking.register_model=false"])


def test_fedmtl_personal_lambda_search_is_a_setting(setup):
    make, manifest = setup
    fed = make(
        "fedmtl",
        "lambda-search-run",
        **{
            "algorithm.personal_lambda_search": "cv",
            "algorithm.personal_lambda_grid": [0.1, 1.0, 10.0],
        },
    )
    assert fed.local.personal_lambda_search == "cv" and fed.local.personal_lambda_grid == (
        0.1,
        1.0,
        10.0,
    )
    _, _, history = run_rounds(fed, manifest.client_ids, 1)
    assert history[-1]["personal/accuracy/mean"] > 0.2
    with pytest.raises(ValueError):
        load_config(None, ["algorithm.personal_lambda_grid=[0.1, 0]"])
    with pytest.raises(ValueError):
        load_config(None, ["algorithm.personal_lambda_search=evidence"])


def test_fedmtl_loo_keeps_the_group_head_unless_the_clients_rows_show_a_personal_head_better(
    setup,
):
    """personal_lambda_search: loo, the default. Labels drawn from the group head: the client
    keeps the group head's weights (λ = ∞: the group head, or it with its own output bias);
    labels that follow a very different head: the personal head at the fixed λ, better than the
    group head on the client's rows; a label shift: the group head does not stay. Reads only
    train rows; deterministic; under 3 rows, the MAP fit at the fixed λ."""
    from fedmtl.client.personal import choose_by_loo, fit_personal_heads

    make, manifest = setup
    fed = make("fedmtl", "loo")
    assert fed.local.personal_lambda_search == "loo"  # the default
    _, ctx, state, data = one_client(fed)
    head = ctx.model.heads["label"]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, data.x_train.shape[1], generator=gen)
    group = {"label": 3 * torch.randn(state.heads_for(data.group)["label"].shape, generator=gen)}
    with torch.no_grad():
        assign(ctx.model.base, state.base)
        ctx.model.base.eval()
        z = ctx.model.base(x)
        assign(head, -group["label"])
        differ = head(z).argmax(1)

    def choose(labels):
        rows = _client_like(data, x, {"label": labels})
        return choose_by_loo(ctx.model, state.base, group, rows, ctx.tasks, 0.3)

    for seed in range(3):
        gen.manual_seed(seed)
        with torch.no_grad():
            assign(head, group["label"])
            drawn = torch.multinomial(torch.softmax(head(z), 1), 1, generator=gen).squeeze(1)
        heads, choice = choose(drawn)
        assert choice == {"label": float("inf")}  # the group head's weights (its bias may move)
        weights = ctx.model.heads["label"].weight.numel()
        assert torch.equal(heads["label"][:weights], group["label"][:weights])
    heads, choice = choose(differ)
    assert choice == {"label": 0.3}, choice  # the personal head at the fixed λ
    # a label shift alone (class 0's bias raised above every other class's): the bias moves
    shifted = group["label"].clone()
    n_weights = ctx.model.heads["label"].weight.numel()
    shifted[n_weights] = shifted[n_weights:].max() + 2.0  # the bias of class 0
    with torch.no_grad():
        assign(head, shifted)
        prior_shift = torch.multinomial(torch.softmax(head(z), 1), 1, generator=gen).squeeze(1)
    shift_heads, shift_choice = choose(prior_shift)
    assert float(shift_heads["label"][n_weights] - group["label"][n_weights]) > 2.0  # moved
    if shift_choice == {"label": float("inf")}:  # the bias-adapted head: only the bias moved
        assert torch.equal(shift_heads["label"][:n_weights], group["label"][:n_weights])
    else:
        assert shift_choice == {"label": 0.3}
    heads, choice = choose(differ)
    with torch.no_grad():
        assign(head, heads["label"])
        personal_errors = int((head(z).argmax(1) != differ).sum())
        assign(head, group["label"])
        group_errors = int((head(z).argmax(1) != differ).sum())
    assert personal_errors < group_errors / 3

    # the held-out split is never read: NaN test rows change nothing; deterministic
    rows = _client_like(data, x, {"label": differ})
    poisoned = _client_like(
        data, x, {"label": differ}, x_test=torch.full_like(data.x_test, float("nan"))
    )
    a, _, lam_a = fit_personal_heads(ctx.model, state.base, group, rows, ctx.tasks, 0.3)
    b, _, lam_b = fit_personal_heads(ctx.model, state.base, group, poisoned, ctx.tasks, 0.3)
    assert lam_a == lam_b == choice["label"] and torch.equal(a["label"], b["label"])
    # too few rows for a standard error: the MAP fit at the fixed λ
    few = _client_like(data, x[:2], {"label": differ[:2]})
    assert choose_by_loo(ctx.model, state.base, group, few, ctx.tasks, 0.3)[1] == {"label": 0.3}


def test_fedmtl_loo_does_not_score_a_class_the_client_holds_once(setup):
    """The stratified leave-one-out: leaving out the only row of a class removes the class from
    the refit, while the group head (scored in-sample) saw it; such rows are left out of every
    candidate's score, and the paired rows stay aligned. A regression task scores every row."""
    import dataclasses

    from fedmtl.client.personal import _loo_rows

    make, _ = setup
    fed = make("fedmtl", "loo")
    _, ctx, state, data = one_client(fed)
    task = ctx.tasks[0]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(40, ctx.model.heads["label"].in_features, generator=gen)
    labels = torch.arange(40) % 2  # classes 0 and 1, twenty rows each
    labels[7] = 2  # class 2: held once (row 7)
    heads = ctx.model.heads
    group = _loo_rows(heads, "label", z, labels, task, None)
    alo = _loo_rows(heads, "label", z, labels, task, 0.3)
    with torch.no_grad():
        in_sample = torch.nn.functional.cross_entropy(heads["label"](z), labels, reduction="none")
    kept = torch.arange(40) != 7
    assert group.shape == alo.shape == (39,)
    np.testing.assert_allclose(group, in_sample[kept].numpy(), rtol=1e-6)
    labels[7] = 1  # every class held at least twice: every row scored
    assert _loo_rows(heads, "label", z, labels, task, None).shape == (40,)
    regression = dataclasses.replace(task, kind="regression", classes=())
    one = torch.nn.ModuleDict({"label": torch.nn.Linear(z.shape[1], 1)})
    target = torch.randn(40, generator=gen)
    assert _loo_rows(one, "label", z, target, regression, None).shape == (40,)
    assert _loo_rows(one, "label", z, target, regression, 0.3).shape == (40,)
