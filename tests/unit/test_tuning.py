"""The learning-rate tuning benchmark's choice (benchmarks/tune_lr.py): chosen on other seeds
than those reported, a diverged run never chosen."""

import pytest

from benchmarks.tune_lr import choose, main


def _run(lr: float, seed: int, accuracy: float | None) -> dict:
    base = {"scenario": "s", "method": "m", "seed": seed, "lr": lr}
    return (
        {**base, "failed": "NaN update"}
        if accuracy is None
        else {**base, "personal_accuracy": accuracy}
    )


def test_the_best_mean_over_the_tuning_seeds_is_chosen_and_a_diverged_seed_counts_as_zero():
    runs = [
        _run(0.1, 10, 0.90),
        _run(0.1, 11, 0.92),
        _run(0.2, 10, 0.95),
        _run(0.2, 11, 0.93),
        # best on one seed, diverged on the other: its mean is 0.49
        _run(0.4, 10, 0.98),
        _run(0.4, 11, None),
    ]
    best, means = choose(runs, (0.1, 0.2, 0.4))
    assert best == 0.2
    assert means[0.4] == pytest.approx(0.49)


def test_a_tie_goes_to_the_smaller_learning_rate():
    runs = [_run(0.1, 10, 0.9), _run(0.3, 10, 0.9)]
    assert choose(runs, (0.1, 0.3))[0] == 0.1


def test_tuning_seeds_that_overlap_the_reported_seeds_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--scenarios", "digits-shards", "--methods", "fedmtl", "--tune-seeds", "2,10"])
    assert "must not include the reported seeds" in capsys.readouterr().err
