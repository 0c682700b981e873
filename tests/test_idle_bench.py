"""bench/idle.py's arithmetic on made-up metrics (issue 22, item 8): no timing is asserted anywhere."""

from __future__ import annotations

import pytest

from bench.idle import conditions, idle_gap_s


def test_the_idle_gap_is_the_window_not_spent_in_steps_over_the_steps():
    metrics = {"sled_verifier_batch_size_count": 40.0, "sled_verifier_busy_seconds_total": 1.2}
    assert idle_gap_s(metrics, window_s=2.0) == pytest.approx(0.02)   # 0.8 s idle over 40 steps


@pytest.mark.parametrize("metrics, window_s", [
    ({}, 2.0),                                                                             # no step in the window
    ({"sled_verifier_batch_size_count": 0.0, "sled_verifier_busy_seconds_total": 0.0}, 2.0),
    ({"sled_verifier_batch_size_count": 10.0, "sled_verifier_busy_seconds_total": 2.5}, 2.0),  # busy past the
])                                                                                         # window's edges
def test_no_step_or_no_idle_time_is_no_gap(metrics, window_s):
    assert idle_gap_s(metrics, window_s) == 0.0


def test_conditions_keep_their_kind_and_order():
    assert conditions([0, 20], [20], [50]) == [("gap", 0), ("gap", 20), ("spin", 20), ("touch", 50)]
