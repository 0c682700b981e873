"""The scheduler with a virtual clock: its pieces, and whole simulated fleets (convoys, overload, SLO)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest

from sled_verifier.scheduler import Arrivals, QueueState, SchedulePolicy, StepCost, WakeGate, batch_size, delay_s, plan

POLICY = SchedulePolicy(max_wait_s=0.020, min_gain=0.05, max_drafts=4, max_tokens=20)


def memory_bound() -> StepCost:
    """A step that costs 14 ms plus 0.9 ms per scored token (this machine's quick target, roughly)."""
    cost = StepCost()
    for drafts in (1, 2, 4, 8, 16, 32, 64):
        cost.observe(drafts, 5 * drafts, 0.014 + 0.0009 * 5 * drafts)
    return cost


def linear() -> StepCost:
    """A step with no fixed part: merging saves nothing."""
    cost = StepCost(coef=[0.0, 0.0, 0.001])
    for drafts in (1, 4, 16, 64):
        cost.observe(drafts, 5 * drafts, 0.001 * 5 * drafts)
    return cost


@pytest.mark.parametrize(
    ("name", "queue", "expected", "cost", "now_s", "delay"),
    [
        ("empty queue waits for arrivals", QueueState(0, 0, None), [5.01], memory_bound(), 5.0, None),
        ("nothing else expected: step now", QueueState(1, 5, 5.0), [], memory_bound(), 5.0, 0.0),
        ("a draft due soon is worth waiting for", QueueState(1, 5, 5.0), [5.005], memory_bound(), 5.0, 0.005),
        ("not past the deadline", QueueState(1, 5, 5.0), [5.025], memory_bound(), 5.0, 0.0),
        ("budget counts from when the draft could run", QueueState(1, 5, 4.990), [5.015], memory_bound(), 5.0, 0.0),
        ("waiting pays nothing on a linear step", QueueState(1, 5, 5.0), [5.005], linear(), 5.0, 0.0),
        ("full batch: step now", QueueState(4, 20, 5.0), [5.001], memory_bound(), 5.0, 0.0),
        ("waits for the arrival that makes the best step", QueueState(1, 5, 5.0), [5.002, 5.004, 5.006],
         memory_bound(), 5.0, 0.006),
    ],
)
def test_delay(name, queue, expected, cost, now_s, delay):
    got = delay_s(POLICY, queue, expected, cost, now_s)
    assert got == pytest.approx(delay) if delay is not None else got is None


def contended() -> StepCost:
    """A step that is mostly compute: 15 ms plus 6 ms a draft (the family target on a shared core, wall time)."""
    cost = StepCost()
    for drafts in (1, 2, 4, 8, 16, 32, 64):
        cost.observe(drafts, 5 * drafts, 0.015 + 0.0012 * 5 * drafts)
    return cost


FAST_GAP_S, SLOW_GAP_S = 0.022, 0.176  # k=4 drafts at 1 and at 40 ms a token, plus a 16 ms round trip


@pytest.mark.parametrize(
    ("name", "queued_gap_s", "convoy", "cost", "delay"),
    [
        ("a slow drafter's draft is not held for a long convoy of fast ones", SLOW_GAP_S, 11, contended(), 0.0),
        ("a fast draft waits for its convoy as before", FAST_GAP_S, 11, contended(), 0.020),
        ("a short convoy that saves most of a step is still worth the slow draft's wait", SLOW_GAP_S, 3, memory_bound(),
         0.020),
    ],
)
def test_delay_weighs_round_times(name, queued_gap_s, convoy, cost, delay):
    """A draft queued at 5.0, ``convoy`` fast sessions due at 5.02: without their gaps the step's cost alone decides
    (wait); with them, a wait that moves a convoy's step onto a slow drafter's long round is declined."""
    policy = SchedulePolicy()
    queue = QueueState(1, 5, 5.0, gaps_s=queued_gap_s)
    expected = [5.020] * convoy
    assert delay_s(policy, queue, expected, cost, 5.0) == pytest.approx(0.020)
    assert delay_s(policy, queue, expected, cost, 5.0, gaps_s=[FAST_GAP_S] * convoy) == pytest.approx(delay)


@pytest.mark.parametrize(("costs", "expected"), [([], 0), ([5], 1), ([5] * 5, 4), ([9, 9, 9], 2), ([30, 1], 1)])
def test_batch_size(costs, expected):
    assert batch_size(POLICY, costs) == expected


def test_step_cost_learns_and_does_not_wind_up():
    cost = StepCost()
    truth = lambda drafts, tokens: 0.002 + 0.0003 * drafts + 0.0002 * tokens  # noqa: E731
    rng = random.Random(1)
    for _ in range(40):
        drafts = rng.choice([1, 3, 8, 20, 50])
        cost.observe(drafts, 5 * drafts, truth(drafts, 5 * drafts))
    for _ in range(20_000):  # a long run of one size carries no news about the others
        cost.observe(1, 5, truth(1, 5))
    for drafts in (1, 10, 100):
        assert cost.predict(drafts, 5 * drafts) == pytest.approx(truth(drafts, 5 * drafts), rel=0.05)


def test_arrivals_follow_each_sessions_rhythm():
    arrivals = Arrivals(smoothing=0.5)
    for round_ in range(6):
        t = round_ * 0.1
        for key, gap in (("fast", 0.01), ("slow", 0.05)):
            arrivals.verdict_sent(key, t)
            arrivals.arrived(key, t + gap)
    arrivals.verdict_sent("fast", 1.0)
    arrivals.verdict_sent("slow", 1.0)
    assert arrivals.expected(1.0) == pytest.approx([1.01, 1.05], abs=0.002)
    assert arrivals.expected(1.2) == []            # both far overdue: no longer waited for
    assert [gap for _, gap in arrivals.expected_rounds(1.0)] == pytest.approx([0.01, 0.05], abs=0.002)
    assert arrivals.gap_s("slow") == pytest.approx(0.05, abs=0.002)
    assert arrivals.gap_s("unknown") == arrivals.fleet_gap_s  # no history: the fleet's mean
    arrivals.forget("fast")
    assert arrivals.waiting == 1


# ---- simulated fleets ------------------------------------------------------------------------------------


@dataclass
class SimResult:
    steps: int
    drafts: int
    busy_s: float
    added_waits: list[float]
    rounds: list[int]
    verdict_waits: list[list[float]]  # per session: its drafts' arrival to verdict (queue and step)
    decisions: int = 0

    def mean_verdict_wait(self, sessions) -> float:
        waits = [w for session in sessions for w in self.verdict_waits[session]]
        return sum(waits) / len(waits)

    @property
    def mean_batch(self) -> float:
        return self.drafts / self.steps

    @property
    def busy_per_draft(self) -> float:
        return self.busy_s / self.drafts


def simulate(policy: SchedulePolicy, gaps: list[float], jitter_s: float, step_s, duration_s: float = 20.0,
             predict: bool = True, seed: int = 0, weigh_rounds: bool = False, gate: bool = False) -> SimResult:
    """A fleet on a virtual clock: session i sends its next draft ``gaps[i]`` (+-jitter) after its verdict;
    the server runs the policy whenever it is idle, steps take ``step_s(drafts)``. ``weigh_rounds``: the
    scheduler is told each session's gap, as the service tells it. ``gate``: while waiting, only the arrivals
    a ``WakeGate`` passes (and the wait's end) bring a new decision, as in the service; else every arrival does."""
    rng = random.Random(seed)
    cost, arrivals = StepCost(), Arrivals()
    for drafts in (1, 8, 32):  # as the service calibrates at start
        cost.observe(drafts, 5 * drafts, step_s(drafts))
    events = [(rng.uniform(0, 0.2), i) for i in range(len(gaps))]  # first drafts spread over 200 ms
    heapq.heapify(events)
    queue: dict[int, float] = {}
    now, idle_since, steps, drafts, busy = 0.0, 0.0, 0, 0, 0.0
    wake_gate, wake_at, decisions = WakeGate(), None, 0
    waits, rounds, verdict_waits = [], [0] * len(gaps), [[] for _ in gaps]
    while now < duration_s:
        woken = wake_at is None or now >= wake_at - 1e-12
        while events and events[0][0] <= now:
            at, session = heapq.heappop(events)
            queue[session] = at
            arrivals.arrived(session, at)
            woken = woken or wake_gate.wakes(len(queue), arrivals.gap_s(session) if weigh_rounds else 0.0,
                                             arrivals.waiting)
        if not woken:
            now = min(events[0][0] if events else duration_s, wake_at)
            continue
        decisions, wake_at = decisions + 1, None
        ordered = sorted(queue.items(), key=lambda item: item[1])
        state = QueueState(len(queue), 5 * len(queue), max(ordered[0][1], idle_since) if ordered else None,
                           gaps_s=sum(arrivals.gap_s(session) for session in queue) if weigh_rounds else 0.0)
        expected = arrivals.expected_rounds(now) if predict else []
        decided = plan(policy, state, [at for at, _ in expected], cost, now,
                       gaps_s=[gap for _, gap in expected] if weigh_rounds else ())
        delay = decided.delay_s
        if delay is None or delay > 0:
            next_event = events[0][0] if events else duration_s
            if gate:
                wake_gate.arm(state.drafts, decided)
                wake_at = now + delay if delay is not None else None
            now = min(next_event, now + delay) if delay is not None else next_event
            continue
        wake_gate.disarm()
        batch = ordered[: batch_size(policy, [5] * len(ordered))]
        seconds = step_s(len(batch))
        cost.observe(len(batch), 5 * len(batch), seconds)
        for session, at in batch:
            del queue[session]
            waits.append(now - max(at, idle_since))
            rounds[session] += 1
        now += seconds
        idle_since = now
        for session, at in batch:
            verdict_waits[session].append(now - at)
            arrivals.verdict_sent(session, now)
            heapq.heappush(events, (now + max(0.0, gaps[session] + rng.uniform(-jitter_s, jitter_s)), session))
        steps, drafts, busy = steps + 1, drafts + len(batch), busy + seconds
    return SimResult(steps, drafts, busy, waits, rounds, verdict_waits, decisions)


def step_memory_bound(drafts: int) -> float:
    return 0.014 + 0.0045 * drafts


def test_convoys_merge():
    """16 sessions that come back well within a step's time: without prediction they split into convoys
    that never merge; with it (default budget), nearly the whole fleet shares each step, for less per draft."""
    policy = SchedulePolicy()
    gaps = [0.02] * 16
    greedy = simulate(policy, gaps, 0.004, step_memory_bound, predict=False)
    merged = simulate(policy, gaps, 0.004, step_memory_bound)
    assert greedy.mean_batch < 10
    assert merged.mean_batch > 14
    assert merged.busy_per_draft < 0.95 * greedy.busy_per_draft


def test_added_wait_stays_within_the_slo():
    policy = SchedulePolicy(max_wait_s=0.015)
    rng = random.Random(3)
    gaps = [rng.uniform(0.005, 0.2) for _ in range(24)]
    result = simulate(policy, gaps, 0.01, step_memory_bound)
    assert max(result.added_waits) <= 0.015 + 1e-9
    assert result.mean_batch > 2


def test_no_session_is_starved_under_overload():
    """64 sessions that return at once, a server that cannot keep up, batches capped at 16: every session
    gets a share of the steps within 20% of equal."""
    policy = SchedulePolicy(max_wait_s=0.020, max_drafts=16)
    result = simulate(policy, [0.001] * 64, 0.0005, step_memory_bound, duration_s=30.0)
    mean = sum(result.rounds) / len(result.rounds)
    assert min(result.rounds) >= 0.8 * mean and max(result.rounds) <= 1.2 * mean


def test_a_slow_drafter_is_not_left_a_convoy_step_behind():
    """11 fast devices (k=4 at 1 ms a token) and 5 slow ones (40 ms a token: a 0.5B draft on a Pi 5) on a mostly
    compute-bound step. Weighing only the step's cost, each slow draft, arriving during a convoy's step, then
    waits for the convoy's next arrival and its step as well: ~160 ms from arrival to verdict against the fast
    devices' ~100 ms. Weighing round times it steps on its own instead (~50 ms), for ~13% more server time a
    draft here (seeds 0-2)."""
    policy = SchedulePolicy()
    gaps = [FAST_GAP_S] * 11 + [SLOW_GAP_S] * 5
    step = lambda drafts: 0.015 + 0.006 * drafts  # noqa: E731
    cost_only = simulate(policy, gaps, 0.007, step)
    weighed = simulate(policy, gaps, 0.007, step, weigh_rounds=True)
    fast, slow = range(11), range(11, 16)
    assert weighed.mean_verdict_wait(slow) < 0.6 * cost_only.mean_verdict_wait(slow)
    assert weighed.mean_verdict_wait(fast) < 1.1 * cost_only.mean_verdict_wait(fast)
    assert weighed.busy_per_draft < 1.2 * cost_only.busy_per_draft
    assert max(weighed.added_waits) <= policy.max_wait_s + 1e-9


def test_like_rounds_wait_as_before():
    """Sessions of one rhythm: weighing round times changes nothing (convoys merge as on the step's cost alone)."""
    policy = SchedulePolicy()
    gaps = [0.02] * 16
    cost_only = simulate(policy, gaps, 0.004, step_memory_bound)
    weighed = simulate(policy, gaps, 0.004, step_memory_bound, weigh_rounds=True)
    assert weighed.mean_batch > 0.95 * cost_only.mean_batch
    assert weighed.busy_per_draft < 1.02 * cost_only.busy_per_draft


@pytest.mark.parametrize("name, gaps, jitter_s, step, weigh, decisions", [
    ("convoy of 64", [0.02] * 64, 0.004, step_memory_bound, False, 0.2),
    ("convoy of 16", [0.02] * 16, 0.004, step_memory_bound, False, 0.3),
    ("rhythms 5-146 ms", [0.005 + 0.003 * i for i in range(48)], 0.01, step_memory_bound, True, 0.5),
    ("slow drafters", [FAST_GAP_S] * 11 + [SLOW_GAP_S] * 5, 0.007, lambda drafts: 0.015 + 0.006 * drafts, True, 1.0),
])
def test_a_gated_wait_steps_as_every_arrival_would(name, gaps, jitter_s, step, weigh, decisions):
    """Re-deciding at every arrival costs O(N) a draft. Gated (``WakeGate``), the fleet gets the same batches,
    server time a draft and verdict waits, the slowest sessions' included, from a fraction of the decisions."""
    for seed in (0, 1):
        every = simulate(SchedulePolicy(), gaps, jitter_s, step, seed=seed, weigh_rounds=weigh)
        gated = simulate(SchedulePolicy(), gaps, jitter_s, step, seed=seed, weigh_rounds=weigh, gate=True)
        assert gated.mean_batch == pytest.approx(every.mean_batch, rel=0.03)
        assert gated.busy_per_draft == pytest.approx(every.busy_per_draft, rel=0.02)
        for group in (range(len(gaps)), [i for i, gap in enumerate(gaps) if gap == max(gaps)]):
            assert gated.mean_verdict_wait(group) == pytest.approx(every.mean_verdict_wait(group), rel=0.08)
        assert max(gated.added_waits) <= SchedulePolicy().max_wait_s + 1e-9
        assert gated.decisions <= decisions * every.decisions, (gated.decisions, every.decisions)


def test_the_best_wait_is_found_as_pricing_every_arrival_finds_it():
    """``plan`` bisects for the cheapest step (a linear cost is monotone a draft); fuzzed against pricing each
    arrival in turn, the old loop: the same wait, on memory-bound, compute-bound and fitted costs."""
    rng = random.Random(7)
    costs = [memory_bound(), linear(), contended(), StepCost(coef=[0.03, 0.002, 0.0004]),
             StepCost(coef=[-0.002, 0.001, 0.0015])]
    for _ in range(3000):
        cost, policy = rng.choice(costs), SchedulePolicy(max_drafts=rng.choice([4, 16, 64, 256]))
        drafts = rng.randint(1, 40)
        k1, prefill = rng.randint(1, 9), rng.choice([0, 0, 0, rng.randint(1, 300)])
        queue = QueueState(drafts, drafts * k1 + prefill, 5.0 - rng.uniform(0, 0.04), prefill_tokens=prefill)
        expected = sorted(5.0 + rng.uniform(0, 0.06) for _ in range(rng.randint(0, 80)))
        got = delay_s(policy, queue, expected, cost, 5.0)
        assert got == pytest.approx(_priced_one_by_one(policy, queue, expected, cost, 5.0), abs=1e-12)


def _priced_one_by_one(policy, queue, expected, cost, now_s):
    """The wait ``delay_s`` chose before bisection (no round weighing), pricing each arrival in turn."""
    if queue.drafts >= policy.max_drafts or queue.tokens >= policy.max_tokens or not expected:
        return 0.0
    deadline = queue.ready_since_s + policy.max_wait_s
    if deadline - now_s < 0.0002:
        return 0.0
    k1 = (queue.tokens - queue.prefill_tokens) / queue.drafts
    now_cost = cost.predict(queue.drafts, queue.tokens) / queue.drafts
    best_cost, best_joined = now_cost, 0
    for joined, at in enumerate(expected, start=1):
        if at > deadline or queue.drafts + joined > policy.max_drafts:
            break
        per_draft = cost.predict(queue.drafts + joined, round(queue.tokens + joined * k1)) / (queue.drafts + joined)
        if per_draft < best_cost:
            best_cost, best_joined = per_draft, joined
    if not best_joined or best_cost > now_cost * (1 - policy.min_gain):
        return 0.0
    return min(max(expected[best_joined - 1] - now_s, 0.0002), deadline - now_s)


def test_a_compute_bound_server_does_not_wait():
    policy = SchedulePolicy()
    result = simulate(policy, [0.02] * 8, 0.004, lambda drafts: 0.004 * drafts)
    assert sum(result.added_waits) / len(result.added_waits) < 0.001
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


def test_limits_and_batch_defaults_have_one_source(tmp_path):
    """VerifierConfig's defaults are the only defaults: its wire limits are Limits', the scheduler's batch
    limits and the engine's context and prefill budget are its own; and they are the documented figures."""
    import inspect

    from sled_protocol import Limits
    from sled_verifier.config import VerifierConfig
    from sled_verifier.engine import Quotas, VerifierEngine

    (tmp_path / "config.json").write_text("{}")
    config = VerifierConfig(target=str(tmp_path), verifier_id="v")
    assert (config.max_batch_drafts, config.max_batch_tokens, config.max_draft_tokens, config.max_context_tokens) \
        == (256, 4096, 16, 4096)
    assert Limits(config.max_message_bytes, config.max_draft_tokens, config.max_context_tokens) == Limits()
    assert SchedulePolicy() == SchedulePolicy.from_config(config) == SchedulePolicy(0.050, 0.02, 256, 4096)
    engine_defaults = inspect.signature(VerifierEngine).parameters
    assert engine_defaults["max_context"].default == config.max_context_tokens
    assert Quotas() == Quotas.from_config(config) == engine_defaults["quotas"].default
    assert (Quotas().prefill_chunk, Quotas().max_prefill, Quotas().device_max_sessions) \
        == (config.prefill_chunk_tokens, config.max_prefill_tokens, config.device_max_sessions)
    custom = VerifierConfig(target=str(tmp_path), verifier_id="v", max_wait_ms=12.5, min_wait_gain=0.1,
                            max_batch_drafts=7, max_batch_tokens=99)
    assert SchedulePolicy.from_config(custom) == SchedulePolicy(0.0125, 0.1, 7, 99)


def test_two_widths_separate_a_drafts_cost_from_a_tokens():
    """The step cost fitted from the service's calibration recovers the per-draft and per-token split only when
    the samples vary tokens a draft (engine.calibrate's widths 1 and 5); at one width the split is arbitrary."""
    def true_s(drafts: int, tokens: int) -> float:
        return 0.010 + 0.002 * drafts + 0.004 * tokens    # token-bound: k = 0-1 is the cheapest per token

    two = StepCost()
    for _ in range(2):
        for drafts in (1, 8, 32):
            for width in (1, 5):
                two.observe(drafts, drafts * width, true_s(drafts, drafts * width))
    assert two.coef[2] == pytest.approx(0.004, rel=0.1) and two.coef[1] == pytest.approx(0.002, rel=0.35)
    one = StepCost()
    for _ in range(2):
        for drafts in (1, 8, 32):
            one.observe(drafts, drafts * 5, true_s(drafts, drafts * 5))
    assert one.coef[1] > 2 * 0.002  # at one width the fit puts a share of each token's cost on the draft
