"""The batching policy with a fake clock: when to flush, how much to take."""

from __future__ import annotations

import pytest

from sled_verifier.batching import BatchPolicy, QueueView, flush_delay_s, take_batch

POLICY = BatchPolicy(window_ms=10.0, max_drafts=4, max_tokens=20)


@pytest.mark.parametrize(
    ("name", "queue", "now_s", "idle", "expected"),
    [
        ("empty queue waits for arrivals", QueueView(0, 0, None, 0), 5.0, True, None),
        ("busy model never flushes", QueueView(3, 12, 1.0, 0), 5.0, False, None),
        ("nothing else coming: flush at once", QueueView(1, 5, 5.0, 0), 5.0, True, 0.0),
        ("straggler expected: wait out the window", QueueView(1, 5, 5.0, 2), 5.0, True, 0.010),
        ("part of the window already spent", QueueView(1, 5, 5.0, 2), 5.004, True, 0.006),
        ("window expired: flush", QueueView(1, 5, 5.0, 2), 5.011, True, 0.0),
        ("max drafts reached: flush", QueueView(4, 8, 5.0, 3), 5.0, True, 0.0),
        ("max tokens reached: flush", QueueView(2, 20, 5.0, 3), 5.0, True, 0.0),
    ],
)
def test_flush_delay(name, queue, now_s, idle, expected):
    delay = flush_delay_s(POLICY, queue, now_s, idle)
    assert delay == pytest.approx(expected) if expected is not None else delay is None


def test_zero_window_flushes_whenever_idle():
    assert flush_delay_s(BatchPolicy(window_ms=0), QueueView(1, 5, 5.0, 7), 5.0, True) == 0.0


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        ([], 0),
        ([5], 1),
        ([5, 5, 5, 5, 5], 4),     # max_drafts
        ([9, 9, 9], 2),           # 27 tokens would pass max_tokens 20
        ([30, 1], 1),             # one oversized draft still goes alone
        ([5, 5, 10, 1], 3),       # exactly 20 fits
    ],
)
def test_take_batch(costs, expected):
    assert take_batch(POLICY, costs) == expected


def test_rate_limiter_refuses_a_flooding_device_only():
    from sled_verifier.ratelimit import RateLimiter

    limiter = RateLimiter(rate_per_s=10, burst=5, max_devices=3)
    assert [limiter.allow("flood", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("calm", 0.0)
    assert limiter.allow("flood", 0.1)          # refilled one token in 0.1 s
    assert not limiter.allow("flood", 0.1)
    for device in ("a", "b", "c", "d"):
        limiter.allow(device, 1.0)
    assert len(limiter) == 3                     # bounded
