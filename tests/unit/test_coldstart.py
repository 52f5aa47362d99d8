"""Cold start for a client that never trained: group choice, the head fine-tune, the fallbacks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.client.training import load_weights
from fedmtl.data.manifest import TaskSpec
from fedmtl.lifecycle.coldstart import (
    COLD_START,
    GLOBAL,
    ColdStartSettings,
    encode_support,
    personalize,
    support_loss,
)
from fedmtl.server.grouping import lowest_loss
from fedmtl.state import flat
from models import build_model

N_FEATURES, N_CLASSES = 6, 4
LABEL = TaskSpec("label", "classification", list(range(N_CLASSES)))
SCORE = TaskSpec("score", "regression", [])


def make_model(tasks):
    torch.manual_seed(0)
    cfg = SimpleNamespace(base="mlp", hidden=[16], dropout=0.0, cnn_channels=[16])
    return build_model(cfg, N_FEATURES, tasks)


@pytest.fixture(scope="module")
def planted():
    """A base, three group heads that disagree (label permutations of one head), a global
    head, and a sampler of rows labelled by a group's head."""
    model = make_model([LABEL, SCORE])
    base = flat(model.base)
    torch.manual_seed(1)
    w, b = torch.randn(N_CLASSES, 16) * 3, torch.randn(N_CLASSES)
    score = flat(model.heads["score"])
    perms = {"g0": [0, 1, 2, 3], "g1": [1, 2, 3, 0], "g2": [3, 2, 1, 0]}
    group_heads = {
        g: {"label": torch.cat([w[p].flatten(), b[p]]), "score": score.clone()}
        for g, p in perms.items()
    }
    global_heads = {
        "label": torch.cat([w.mean(0).repeat(N_CLASSES, 1).flatten(), b.mean().repeat(N_CLASSES)]),
        "score": score.clone(),
    }

    def sample(group: str, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(k, N_FEATURES, generator=g)
        load_weights(model, base, group_heads[group])
        with torch.no_grad():
            out = model(x)
        return x, {"label": out["label"].argmax(1), "score": out["score"].squeeze(-1) + 1.0}

    return model, base, group_heads, global_heads, sample


def test_group_choice_picks_the_group_whose_head_labelled_the_rows(planted):
    model, base, group_heads, global_heads, sample = planted
    for i, group in enumerate(group_heads):
        x, y = sample(group, 10, seed=i)
        res = personalize(
            model, base, group_heads, global_heads, x, y, [LABEL, SCORE], {"epochs": 0}
        )
        assert res.group == group and res.source == COLD_START and res.n_labelled == 10
        assert set(res.losses) == set(group_heads)
        assert min(res.losses, key=res.losses.get) == group
        assert torch.equal(
            res.heads["label"], group_heads[group]["label"]
        )  # epochs 0: the group head as is


def test_finetune_is_deterministic_moves_only_the_heads_and_prox_keeps_them_near(planted):
    model, base, group_heads, global_heads, sample = planted
    x, y = sample("g1", 10)
    base_before = base.clone()
    heads_before = {g: {t: v.clone() for t, v in h.items()} for g, h in group_heads.items()}
    cfg = {"epochs": 20, "lr": 0.1, "batch_size": 4, "prox_mu": 0.0}
    a = personalize(model, base, group_heads, global_heads, x, y, [LABEL, SCORE], cfg, seed=3)
    b = personalize(
        make_model([LABEL, SCORE]),
        base,
        group_heads,
        global_heads,
        x,
        y,
        [LABEL, SCORE],
        cfg,
        seed=3,
    )
    for t in ("label", "score"):
        assert torch.equal(a.heads[t], b.heads[t])
        assert not torch.equal(a.heads[t], group_heads["g1"][t])
    assert torch.equal(base, base_before) and torch.equal(flat(model.base), base_before)
    assert all(
        torch.equal(group_heads[g][t], heads_before[g][t])
        for g in group_heads
        for t in ("label", "score")
    )
    # the regression head learns the +1 shift on its own rows
    assert support_loss(model, base, a.heads, x, {"score": y["score"]}, [SCORE]) < support_loss(
        model, base, group_heads["g1"], x, {"score": y["score"]}, [SCORE]
    )
    near = personalize(
        model,
        base,
        group_heads,
        global_heads,
        x,
        y,
        [LABEL, SCORE],
        {**cfg, "prox_mu": 5.0},
        seed=3,
    )
    dist = {
        name: (r.heads["label"] - group_heads["g1"]["label"]).norm()
        for name, r in (("free", a), ("prox", near))
    }
    assert dist["prox"] < 0.5 * dist["free"]


def test_no_labels_gives_the_global_heads(planted):
    model, base, group_heads, global_heads, sample = planted
    x, _ = sample("g0", 5)
    none = {"label": torch.full((5,), -1), "score": torch.full((5,), math.nan)}
    for y in (none, {}):
        res = personalize(model, base, group_heads, global_heads, x, y, [LABEL, SCORE])
        assert res.source == GLOBAL and res.group is None and res.n_labelled == 0
        assert all(torch.equal(res.heads[t], global_heads[t]) for t in global_heads)


def test_without_group_heads_it_starts_from_the_global_heads(planted):
    model, base, _, global_heads, sample = planted
    x, y = sample("g2", 8)
    res = personalize(model, base, {}, global_heads, x, y, [LABEL, SCORE], {"epochs": 0})
    assert res.group is None and res.source == COLD_START and res.losses == {}
    assert torch.equal(res.heads["label"], global_heads["label"])
    tuned = personalize(
        model, base, {}, global_heads, x, y, [LABEL, SCORE], {"epochs": 5, "lr": 0.1}
    )
    assert not torch.equal(tuned.heads["label"], global_heads["label"])


def test_rows_with_some_labels_missing_train_each_head_on_its_own_rows(planted):
    model, base, group_heads, global_heads, sample = planted
    x, y = sample("g2", 12)
    y = {"label": y["label"].clone(), "score": y["score"].clone()}
    y["label"][:6] = -1  # the first half has only the regression target,
    y["score"][6:] = math.nan  # the second half only the class
    res = personalize(
        model, base, group_heads, global_heads, x, y, [LABEL, SCORE], {"epochs": 5, "lr": 0.05}
    )
    assert res.group == "g2" and res.n_labelled == 12
    assert all(torch.isfinite(v).all() for v in res.heads.values())
    # a task without any label keeps the group head; the loss ignores it
    only_class = {"label": y["label"]}
    kept = personalize(
        model, base, group_heads, global_heads, x, only_class, [LABEL, SCORE], {"epochs": 5}
    )
    assert torch.equal(kept.heads["score"], group_heads["g2"]["score"])
    assert not torch.equal(kept.heads["label"], group_heads["g2"]["label"])
    assert math.isfinite(support_loss(model, base, group_heads["g0"], x, y, [LABEL, SCORE]))


def test_encode_support_maps_labels_and_names_the_client_and_label_it_cannot():
    frame = pd.DataFrame({"label": [3, None, 1.0, 0], "score": [0.5, 1.5, None, 2.0]})
    y = encode_support(frame, [LABEL, SCORE], "c9")
    assert y["label"].tolist() == [3, -1, 1, 0]
    assert np.allclose(y["score"].numpy(), [0.5, 1.5, np.nan, 2.0], equal_nan=True)
    assert encode_support(pd.DataFrame({"x": [1]}), [LABEL], "c9")["label"].tolist() == [
        -1
    ]  # no column
    assert encode_support(pd.DataFrame({"label": ["2", None]}), [LABEL])["label"].tolist() == [
        2,
        -1,
    ]  # text
    with pytest.raises(ValueError, match=r"client 'c9'.*label 7 of task 'label'.*declared classes"):
        encode_support(pd.DataFrame({"label": [1, 7]}), [LABEL], "c9")
    with pytest.raises(ValueError, match="client 'c9'.*not numbers"):
        encode_support(pd.DataFrame({"score": ["high"]}), [SCORE], "c9")


def test_label_indices_outside_the_classes_and_unknown_tasks_are_rejected(planted):
    model, base, group_heads, global_heads, sample = planted
    x, _ = sample("g0", 3)
    with pytest.raises(ValueError, match="client 'new'.*label index 9"):
        personalize(
            model,
            base,
            group_heads,
            global_heads,
            x,
            {"label": torch.tensor([0, 9, 1])},
            [LABEL],
            client="new",
        )
    with pytest.raises(ValueError, match="unknown task"):
        personalize(
            model, base, group_heads, global_heads, x, {"colour": torch.tensor([0, 1, 1])}, [LABEL]
        )


def test_lowest_loss_rule_is_choose_groups_nan_last_ties_first():
    assert lowest_loss({"b": 1.0, "a": 1.0, "c": 2.0}) == "a"
    assert lowest_loss({"a": math.nan, "b": 5.0}) == "b"
    with pytest.raises(ValueError):
        lowest_loss({})


def test_settings_come_from_the_config_section():
    from fedmtl.config import Config, ConfigError, load_config

    default = ColdStartSettings.from_any(None)
    assert default == ColdStartSettings.from_any(Config().coldstart)
    cfg = load_config(None, ["coldstart.epochs=3", "coldstart.prox_mu=0.5"])
    assert ColdStartSettings.from_any(cfg.coldstart).epochs == 3
    assert ColdStartSettings.from_any({"lr": 0.3, "unrelated": 1}).lr == 0.3
    with pytest.raises(ConfigError, match=r"coldstart.lr × coldstart.prox_mu must be below 1"):
        load_config(None, ["coldstart.lr=0.5", "coldstart.prox_mu=4"])
