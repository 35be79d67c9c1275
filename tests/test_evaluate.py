"""Statistics of the evaluation on known cases."""

import pytest

from rlhf.evaluate import bootstrap_ci, win_rate


def test_win_rate_counts_ties_as_half():
    rate, wins, ties, losses = win_rate([0.9, 0.5, 0.2, 0.7], [0.1, 0.5, 0.3, 0.6])
    assert (wins, ties, losses) == (2, 1, 1)
    assert rate == pytest.approx((2 + 0.5) / 4)


def test_win_rate_needs_pairs():
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_ci([0.4] * 20) == (pytest.approx(0.4), pytest.approx(0.4))


def test_bootstrap_interval_covers_the_mean_with_the_right_width():
    # 0/1 values with mean 0.5 and n=100: the standard error is 0.05, so the 95% interval is ~0.5 ± 0.098
    values = [0.0, 1.0] * 50
    low, high = bootstrap_ci(values, resamples=4000, seed=1)
    assert low < 0.5 < high
    assert 0.16 < high - low < 0.23
