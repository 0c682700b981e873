"""The adaptive draft length controller, with made-up measurements (no clock, no model)."""

from __future__ import annotations

import random

import pytest

from sled_edge.controller import DraftLengthController, StepPrice, expected_tokens


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


# ---- the server's price (issue 22, items 3 and 4): a fake clock, no model --------------------------------------


class FakeFleet:
    """One device against a server whose step costs ``price``: the round trip is the network plus the step, and the
    clock advances by drafting and round trip; acceptance is drawn per position."""

    def __init__(self, alpha: float, draft_s: float, network_s: float, price: StepPrice, seed: int = 3) -> None:
        self.alpha, self.draft_s, self.network_s, self.price = alpha, draft_s, network_s, price
        self.rng = random.Random(seed)
        self.now_s = 0.0
        self.committed = 0
        self.server_s = 0.0

    def run(self, controller: DraftLengthController, rounds: int, priced: bool = True) -> list[int]:
        ks = []
        for _ in range(rounds):
            k = controller.choose(price=self.price if priced else None)
            accepted = 0
            while accepted < k and self.rng.random() < self.alpha:
                accepted += 1
            step_s = self.price.round_s(k) * self.price.drafts_per_step  # the whole step the round rides in
            round_s = self.network_s + step_s
            self.now_s += k * self.draft_s + round_s
            self.committed += accepted + 1
            self.server_s += self.price.round_s(k)
            controller.observe(k, accepted, k * self.draft_s, round_s)
            ks.append(k)
        return ks


def server_cost_per_token(alpha: float, price: StepPrice, k: int) -> float:
    return price.round_s(k) / expected_tokens([alpha] * 8, k)


# A CPU at N=64 on SmolLM2 (the table): T(64 x 1) = 225 ms, T(64 x 5) = 644 ms -> ~1.64 ms a scored token.
COMPUTE_BOUND = StepPrice(fixed_s=0.120, per_draft_s=0.0, per_token_s=0.00164, drafts_per_step=64)
MEMORY_BOUND = StepPrice(fixed_s=0.048, per_draft_s=0.0002, per_token_s=0.00001, drafts_per_step=1)  # N=1
ALL_COMPUTE = StepPrice(fixed_s=0.0, per_draft_s=0.0, per_token_s=0.002, drafts_per_step=64)


def test_a_memory_bound_server_gets_long_drafts():
    fleet = FakeFleet(0.8, 0.001, 0.01, MEMORY_BOUND)
    ks = fleet.run(DraftLengthController(k_max=8), 400)
    assert sum(ks[-100:]) / 100 >= 5  # scored tokens are nearly free: draft long


def test_at_a_compute_bound_server_the_device_picks_the_k_that_costs_the_server_least():
    fleet = FakeFleet(0.8, 0.001, 0.01, COMPUTE_BOUND)
    controller = DraftLengthController(k_max=8)
    ks = fleet.run(controller, 600)
    best = min(range(9), key=lambda k: server_cost_per_token(0.8, COMPUTE_BOUND, k))
    assert best == 2
    settled = max(set(ks[-100:]), key=ks[-100:].count)
    assert server_cost_per_token(0.8, COMPUTE_BOUND, settled) <= 1.05 * server_cost_per_token(0.8, COMPUTE_BOUND, best)
    # ... and that is cheaper for the server than the same device unpriced (k for its own speed alone).
    unpriced = FakeFleet(0.8, 0.001, 0.01, COMPUTE_BOUND)
    unpriced.run(DraftLengthController(k_max=8), 600, priced=False)
    assert fleet.server_s / fleet.committed < unpriced.server_s / unpriced.committed


def test_where_drafting_cannot_pay_the_server_decodes_for_the_device():
    # Every scored token costs a full share and acceptance is low: k = 0, i.e. server-only for this device,
    # with an exploration round of k = 1 every explore_every rounds so acceptance keeps being measured.
    fleet = FakeFleet(0.3, 0.001, 0.01, ALL_COMPUTE)
    controller = DraftLengthController(k_max=8)
    ks = fleet.run(controller, 320)
    assert controller.best(price=ALL_COMPUTE) == 0
    assert ks[-160:].count(0) >= 0.9 * 160 and set(ks[-160:]) <= {0, 1}


def test_a_slow_draft_stays_within_its_own_pace():
    # 40 ms a draft token against a 10 ms round trip: drafting makes this device slower than the server decoding
    # for it, so even a memory-bound server's price does not make it draft.
    controller = DraftLengthController(k_max=8, draft_s=0.040, round_s=0.010)
    assert controller.best(price=MEMORY_BOUND) == 0
    assert controller.best() >= 1  # unpriced, it keeps the old rule (k >= 1)


def test_the_price_comes_off_the_wire_or_not_at_all():
    assert StepPrice.from_wire(None) is None and StepPrice.from_wire(()) is None
    assert StepPrice.from_wire((0.1, 0.0, 0.002, 8.0)) == StepPrice(0.1, 0.0, 0.002, 8.0)
    assert StepPrice.from_wire((-1.0, 0.0, 0.002, 0.0)).round_s(0) == 0.002  # clamped: never a negative cost
