"""The adaptive draft length controller, with made-up measurements (no clock, no model)."""

from __future__ import annotations

import random

import pytest

from sled_edge.controller import DraftLengthController, expected_tokens


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_expected_tokens_matches_the_closed_form(alpha):
    for k in range(0, 8):
        assert expected_tokens([alpha] * 8, k) == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha))


def drive(alpha: float, draft_s: float, round_s: float, rounds: int = 2000) -> DraftLengthController:
    rng = random.Random(1)
    controller = DraftLengthController(k_max=10)
    for _ in range(rounds):
        k = controller.choose()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        controller.observe(k, accepted, draft_s * k, round_s)
    return controller


def best_fixed_k(alpha: float, draft_s: float, round_s: float, k_max: int = 10) -> int:
    return max(range(1, k_max + 1), key=lambda k: expected_tokens([alpha] * k_max, k) / (k * draft_s + round_s))


@pytest.mark.parametrize(
    ("alpha", "draft_s", "round_s"),
    [(0.9, 0.001, 0.020), (0.5, 0.001, 0.020), (0.9, 0.010, 0.002), (0.3, 0.002, 0.002), (0.75, 0.003, 0.010)],
)
def test_controller_converges_to_the_best_fixed_k(alpha, draft_s, round_s):
    controller = drive(alpha, draft_s, round_s)
    chosen, best = controller.best(), best_fixed_k(alpha, draft_s, round_s)
    rate = lambda k: expected_tokens([alpha] * 10, k) / (k * draft_s + round_s)  # noqa: E731
    assert rate(chosen) >= 0.97 * rate(best)
    assert controller.acceptance()[0] == pytest.approx(alpha, abs=0.05)


def test_more_acceptance_or_costlier_rounds_mean_longer_drafts():
    assert drive(0.9, 0.001, 0.02).best() > drive(0.4, 0.001, 0.02).best()
    assert drive(0.7, 0.001, 0.05).best() >= drive(0.7, 0.001, 0.002).best()


def test_limits_are_respected():
    controller = DraftLengthController(k_max=6)
    assert controller.choose(limit=0) == 0 and 1 <= controller.choose(limit=2) <= 2
