"""fedmtl.eval.comparison: which settings differ, which final metric is better, how rows look."""

from __future__ import annotations

import math

import pytest

from fedmtl.eval.comparison import (
    BEST_MARK,
    HIGHER,
    LOWER,
    MISSING,
    NEUTRAL,
    RunRecord,
    best_indices,
    compare,
    direction,
    format_value,
    metric_matches,
    metric_rows,
    param_rows,
    tag_rows,
)


def run(run_id: str, params=None, metrics=None, tags=None) -> RunRecord:
    return RunRecord(
        run_id, f"digits-x-{run_id}", dict(params or {}), dict(metrics or {}), dict(tags or {})
    )


@pytest.mark.parametrize(
    "key, expected",
    [
        ("personal/accuracy/mean", HIGHER),
        ("global/f1/worst10", HIGHER),
        ("group/precision/weighted_mean", HIGHER),
        ("personal/recall/mean", HIGHER),
        ("personalisation_gain/accuracy", HIGHER),
        (
            "personalisation_gain/mae",
            HIGHER,
        ),  # the gain is oriented: larger is better for errors too
        ("grouping/ari", HIGHER),
        ("train/loss/mean", LOWER),
        ("personal/mae/mean", LOWER),
        ("basket/personal/rmse/worst10", LOWER),
        ("time/local_train_s", LOWER),
        ("time/tracking_s", LOWER),
        ("grouping/n_groups", NEUTRAL),
        ("clients/participating", NEUTRAL),
        ("clients/failed", NEUTRAL),
    ],
)
def test_direction_of_metrics(key, expected):
    assert direction(key) == expected


def test_best_value_higher_lower_ties_and_gaps():
    assert best_indices([0.5, 0.9, 0.7], HIGHER) == {1}
    assert best_indices([0.5, 0.9, 0.7], LOWER) == {0}
    assert best_indices([0.9, 0.5, 0.9], HIGHER) == {0, 2}  # a tie marks both
    assert best_indices([0.9, 0.9], HIGHER) == set()  # all equal: nothing to mark
    assert best_indices([0.1, 0.9], NEUTRAL) == set()
    assert best_indices([None, 0.9], HIGHER) == set()  # one value: nothing to compare
    assert best_indices([None, 0.4, 0.2], LOWER) == {2}
    assert best_indices([math.nan, 0.4, 0.2], HIGHER) == {1}


def test_param_rows_only_differences_unless_all():
    a = run("a" * 32, {"algorithm.method": "fedmtl", "training.rounds": "2", "only.a": "1"})
    b = run("b" * 32, {"algorithm.method": "fedavg", "training.rounds": "2"})
    rows = param_rows([a, b])
    assert [r.key for r in rows] == ["algorithm.method", "only.a"]
    assert rows[0].values == ("fedmtl", "fedavg")
    assert rows[1].values == ("1", None)
    assert rows[1].cells() == ["1", MISSING]
    assert [r.key for r in param_rows([a, b], all_params=True)] == [
        "algorithm.method",
        "only.a",
        "training.rounds",
    ]
    assert all(not r.best for r in rows)  # settings are never "better"


def test_tag_rows_show_differing_provenance():
    a = run("a" * 32, tags={"data_version": "v1", "git_commit": "abc", "method": "fedmtl"})
    b = run("b" * 32, tags={"data_version": "v2", "git_commit": "abc", "method": "fedavg"})
    assert [(r.key, r.values) for r in tag_rows([a, b])] == [("tags.data_version", ("v1", "v2"))]
    assert {r.key for r in tag_rows([a, b], all_tags=True)} == {
        "tags.data_version",
        "tags.git_commit",
    }


def test_metric_rows_order_filter_and_marks():
    a = run(
        "a" * 32,
        metrics={
            "time/evaluate_s": 0.5,
            "personal/accuracy/mean": 0.95,
            "global/accuracy/mean": 0.33,
            "grouping/n_groups": 2.0,
            "train/loss/mean": 0.4,
            "zeta/other": 1.0,
        },
    )
    b = run(
        "b" * 32,
        metrics={
            "time/evaluate_s": 0.25,
            "personal/accuracy/mean": 0.60,
            "global/accuracy/mean": 0.61,
            "grouping/n_groups": 1.0,
            "train/loss/mean": 0.9,
        },
    )
    rows = {r.key: r for r in metric_rows([a, b])}
    assert list(rows) == [
        "personal/accuracy/mean",
        "global/accuracy/mean",
        "grouping/n_groups",
        "train/loss/mean",
        "time/evaluate_s",
        "zeta/other",
    ]
    assert rows["personal/accuracy/mean"].best == {0}
    assert rows["global/accuracy/mean"].best == {1}
    assert rows["train/loss/mean"].best == {0}
    assert rows["time/evaluate_s"].best == {1}
    assert rows["grouping/n_groups"].best == set()
    assert rows["zeta/other"].values == (1.0, None)
    assert rows["personal/accuracy/mean"].cells() == [f"0.9500 {BEST_MARK}", "0.6000"]
    assert rows["grouping/n_groups"].cells() == ["2", "1"]

    only = [r.key for r in metric_rows([a, b], ["personal/*", "loss"])]
    assert only == ["personal/accuracy/mean", "train/loss/mean"]


def test_metric_patterns():
    assert metric_matches("personal/accuracy/mean", None)
    assert metric_matches("personal/accuracy/mean", ["accuracy"])
    assert metric_matches("time/evaluate_s", ["time/*"])
    assert not metric_matches("personal/accuracy/mean", ["time/*"])
    assert not metric_matches("personal/accuracy/mean", ["personal/*/worst10"])


def test_compare_three_runs():
    runs = [
        run(c * 32, {"algorithm.method": m}, {"personal/accuracy/mean": v})
        for c, m, v in (("a", "fedmtl", 0.9), ("b", "fedavg", 0.5), ("c", "ditto", 0.9))
    ]
    result = compare(runs)
    assert result.params[0].values == ("fedmtl", "fedavg", "ditto")
    assert result.metrics[0].best == {0, 2}
    assert result.tags == ()


def test_format_value():
    assert format_value(None) == MISSING
    assert format_value(3.0) == "3"
    assert format_value(0.123456) == "0.1235"
    assert format_value(0.000123) == "0.000123"
    assert format_value(0.0) == "0"
    assert format_value("fedavg") == "fedavg"
    assert format_value(-0.0251) == "-0.0251"
