"""When to run the next verification step: a pure policy over the queue, the fleet's rhythm and a cost model.

A fixed batching window splits a fleet into convoys that never merge: sessions whose drafts miss one
step's window run in the next, get their verdicts later, and so keep missing. Here the verifier knows

- what a step costs: seconds as a linear function of (1, drafts, tokens scored), fitted online by
  recursive least squares with forgetting (``StepCost``); on CPU a step is largely memory bound at small
  batches (one more draft is almost free) and compute bound at large ones (waiting saves nothing);
- when each active session will send its next draft: one "gap" after its last verdict (the device's
  drafting plus the network round trip), learned per session as an exponentially weighted mean and
  deviation (``Arrivals``).

``delay_s`` runs a step when waiting no longer pays, within each draft's wait budget ``max_wait_s`` (the SLO
on the wait the scheduler adds: counted from when a draft could first have run, its arrival or the end of
the step it arrived during): with drafts Q queued and sessions A_1..A_m predicted to arrive before the
oldest draft's deadline, it compares the server cost per draft of stepping now, cost(Q)/|Q|, with that of the
best merged step, cost(Q + A_1..A_j)/(|Q| + j), and waits for A_j only if that is at least ``min_gain``
cheaper (a queue ``held``, holding only drafts of devices over their share of the verifier's time while others
have work, waits its whole budget: those drafts ride along the others' steps, or step on their own at most once
a ``max_wait_s``; a queue of sessions' first rounds alone, ``prefill_only``, steps at once: their prefill is a
forward of its own, which merged rounds would only wait for). So a memory-bound server waits for stragglers and convoys merge (after one merged step the
sessions share a rhythm and arrive together), a compute-bound one does not wait at all, nobody waits
past the deadline, and when every active session is queued the step runs at once. Drafts are taken
oldest first and one per session, so under overload every session gets an equal share of steps.

A wait is weighed by round time too (issue 22, item 5): a session's rate is tokens per round, and a device
drafting slowly (a 0.5B draft on a Pi 5, 40 ms a token) has rounds several times a fast one's. Its draft,
arriving during a fast convoy's step, would wait out that step and then the convoy's next arrival and its
step; a wait that moves more round-weighted delay onto the longer rounds than the server time it saves is
declined (``_onto_longer_rounds``), so that draft steps on its own. Between sessions of like rounds nothing
changes.

Anchors: WISP (arXiv 2601.11652: a verification-time estimator driving SLO-aware batching) and GoodSpeed
(fairness across drafters). Pure: no asyncio, no clock of its own; ``now_s`` is an argument.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from sled_verifier.config import VerifierConfig


@dataclass(frozen=True)
class SchedulePolicy:
    """The batching limits, in the scheduler's units; the defaults are ``VerifierConfig``'s (the one source)."""

    max_wait_s: float = VerifierConfig.max_wait_ms / 1000.0  # longest a queued draft waits for others (the SLO)
    min_gain: float = VerifierConfig.min_wait_gain           # waiting must cut the cost per draft by this fraction
    max_drafts: int = VerifierConfig.max_batch_drafts
    max_tokens: int = VerifierConfig.max_batch_tokens

    @classmethod
    def from_config(cls, config: VerifierConfig) -> SchedulePolicy:
        return cls(config.max_wait_ms / 1000.0, config.min_wait_gain, config.max_batch_drafts, config.max_batch_tokens)


@dataclass(frozen=True)
class QueueState:
    drafts: int
    tokens: int                   # tokens a step over the whole queue would score (drafts + prefill)
    ready_since_s: float | None   # since when the oldest draft could have run: max(its arrival, model idle)
    prefill_tokens: int = 0       # the prefill part of ``tokens`` (predicted arrivals bring none)
    held: bool = False            # every draft a step could take is of a device over its share of time
    prefill_only: bool = False    # every draft a step could take opens a session (its prefill is the step's work)
    gaps_s: float = 0.0           # sum of the queued sessions' gaps (drafting + network: their rounds outside the verifier)


@dataclass
class StepCost:
    """Seconds of one step as ``c . (1, drafts, tokens)``; recursive least squares with forgetting ``decay``.

    Starts from a prior (``coef``, a small CPU's figures; the service calibrates on its own hardware at
    start). The covariance is capped (``max_trace``) so that a long run of steps of one size, which
    carries no information about the other directions, cannot wind it up."""

    coef: list[float] = field(default_factory=lambda: [0.005, 0.0005, 0.0005])
    decay: float = 0.98
    max_trace: float = 10.0
    _p: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self._p:
            scale = [1.0, 1.0 / 16, 1.0 / 256]  # features differ in magnitude; keep the prior's pull comparable
            self._p = [[(scale[i] if i == j else 0.0) for j in range(3)] for i in range(3)]

    def predict(self, drafts: int, tokens: int) -> float:
        x = (1.0, float(drafts), float(tokens))
        return max(1e-6, sum(c * v for c, v in zip(self.coef, x)))

    def price(self, drafts_per_step: float) -> tuple[float, float, float, float]:
        """What ``Status.step_cost`` announces (issue 22): (fixed, per draft, per scored token) in seconds, each
        clamped at 0 (a fit may dip below), and the drafts a step has recently held."""
        return (*(max(0.0, c) for c in self.coef), max(1.0, drafts_per_step))

    def observe(self, drafts: int, tokens: int, seconds: float) -> None:
        x = (1.0, float(drafts), float(tokens))
        px = [sum(self._p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denominator = self.decay + sum(x[i] * px[i] for i in range(3))
        gain = [v / denominator for v in px]
        error = seconds - sum(c * v for c, v in zip(self.coef, x))
        self.coef = [c + g * error for c, g in zip(self.coef, gain)]
        self._p = [[(self._p[i][j] - gain[i] * px[j]) / self.decay for j in range(3)] for i in range(3)]
        trace = sum(self._p[i][i] for i in range(3))
        if trace > self.max_trace:
            self._p = [[v * self.max_trace / trace for v in row] for row in self._p]


@dataclass
class _Rhythm:
    gap_s: float
    dev_s: float


def _same(key: Hashable) -> Hashable:
    return key


@dataclass
class Arrivals:
    """Each active session's next arrival, predicted from recent gaps (verdict sent -> next draft).

    Gaps are learned per ``rhythm_of(key)``: the service passes the device, whose drafting speed and
    network outlive any one of its sessions, so a new session is predicted well from its first round.
    A key with no history yet is predicted with the fleet's mean gap. A session overdue by more than
    ``grace_devs`` deviations (plus ``grace_s``) is no longer waited for: it joins a later step when it comes.
    Bounded: at most ``max_sessions`` are tracked, the longest-waited-on forgotten first."""

    max_sessions: int = 1024
    smoothing: float = 0.3
    grace_devs: float = 3.0
    grace_s: float = 0.002
    forget_s: float = 60.0
    fleet_gap_s: float = 0.02
    fleet_dev_s: float = 0.01
    rhythm_of: Callable[[Hashable], Hashable] = _same
    _rhythm: OrderedDict[Hashable, _Rhythm] = field(default_factory=OrderedDict)
    _waiting: OrderedDict[Hashable, float] = field(default_factory=OrderedDict)  # key -> verdict sent at

    def verdict_sent(self, key: Hashable, now_s: float) -> None:
        self._waiting.pop(key, None)
        self._waiting[key] = now_s
        while len(self._waiting) > self.max_sessions:
            self._waiting.popitem(last=False)

    def arrived(self, key: Hashable, now_s: float) -> None:
        sent = self._waiting.pop(key, None)
        if sent is None:
            return
        gap = now_s - sent
        a = self.smoothing
        rhythm = self._rhythm.pop(self.rhythm_of(key), None) or _Rhythm(gap, self.fleet_dev_s)
        rhythm.dev_s = (1 - a) * rhythm.dev_s + a * abs(gap - rhythm.gap_s)
        rhythm.gap_s = (1 - a) * rhythm.gap_s + a * gap
        self._rhythm[self.rhythm_of(key)] = rhythm
        while len(self._rhythm) > self.max_sessions:
            self._rhythm.popitem(last=False)
        b = a / 4
        self.fleet_dev_s = (1 - b) * self.fleet_dev_s + b * abs(gap - self.fleet_gap_s)
        self.fleet_gap_s = (1 - b) * self.fleet_gap_s + b * gap

    def forget(self, key: Hashable) -> None:
        """Stop expecting ``key`` (its rhythm stays: the device's next session will keep it)."""
        self._waiting.pop(key, None)

    def gap_s(self, key: Hashable) -> float:
        """The mean gap of ``key``'s rounds (its device's drafting plus the network): its round outside the verifier."""
        rhythm = self._rhythm.get(self.rhythm_of(key))
        return rhythm.gap_s if rhythm is not None else self.fleet_gap_s

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def waiting_rhythms(self) -> frozenset[Hashable]:
        """The ``rhythm_of`` (the service: devices) of every key whose next arrival is expected."""
        return frozenset(self.rhythm_of(key) for key in self._waiting)

    def expected(self, now_s: float) -> list[float]:
        """Predicted arrival times (>= now) of the sessions still expected, soonest first."""
        return [at for at, _ in self.expected_rounds(now_s)]

    def expected_rounds(self, now_s: float) -> list[tuple[float, float]]:
        """(predicted arrival time >= now, the session's gap) of the sessions still expected, soonest first."""
        times = []
        for key, sent in list(self._waiting.items()):
            if now_s - sent > self.forget_s:
                del self._waiting[key]
                continue
            rhythm = self._rhythm.get(self.rhythm_of(key)) or _Rhythm(self.fleet_gap_s, self.fleet_dev_s)
            due = sent + rhythm.gap_s
            if due >= now_s:
                times.append((due, rhythm.gap_s))
            elif now_s - due <= self.grace_devs * rhythm.dev_s + self.grace_s:
                times.append((now_s + max(rhythm.dev_s, 0.0005), rhythm.gap_s))  # late, but within its usual jitter
        times.sort()
        return times


@dataclass(frozen=True)
class Plan:
    """``plan``'s answer: ``delay_s`` as ``delay_s`` returns it, and what the wait is for (``WakeGate``)."""

    delay_s: float | None
    joined: int = 0                 # arrivals after which the decision is due again (0: any arrival)
    round_s: float = float("inf")   # the longest gap among the drafts the decision weighed (inf: gaps not weighed)


STEP_NOW = Plan(0.0)


def delay_s(policy: SchedulePolicy, queue: QueueState, expected: Sequence[float], cost: StepCost,
            now_s: float, slack_s: float = 0.0, gaps_s: Sequence[float] = ()) -> float | None:
    """0.0: step now; > 0: look again after that many seconds (or at the next arrival); None: queue empty.
    ``slack_s``: how late the caller's wake-ups run on average; the deadline moves twice that much earlier.
    ``gaps_s``: each expected session's gap (``Arrivals.expected_rounds``), for waiting by round time."""
    return plan(policy, queue, expected, cost, now_s, slack_s, gaps_s).delay_s


def plan(policy: SchedulePolicy, queue: QueueState, expected: Sequence[float], cost: StepCost,
         now_s: float, slack_s: float = 0.0, gaps_s: Sequence[float] = ()) -> Plan:
    """``delay_s``, with how many of ``expected`` a wait is for and the longest round it weighed."""
    if queue.drafts == 0:
        return Plan(None)
    if queue.held:  # only devices over their share: they ride along others' steps, or step once the budget is out
        deadline = (queue.ready_since_s if queue.ready_since_s is not None else now_s) + policy.max_wait_s - 2 * slack_s
        return STEP_NOW if deadline - now_s < 0.0002 else Plan(deadline - now_s)
    if queue.prefill_only:  # prefill is a forward of its own: merging rounds into it saves nothing, lengthens theirs
        return STEP_NOW
    if not expected or queue.drafts >= policy.max_drafts or queue.tokens >= policy.max_tokens:
        return STEP_NOW
    deadline = (queue.ready_since_s if queue.ready_since_s is not None else now_s) + policy.max_wait_s - 2 * slack_s
    if deadline - now_s < 0.0002:
        return STEP_NOW
    tokens_per_draft = (queue.tokens - queue.prefill_tokens) / queue.drafts
    now_cost = cost.predict(queue.drafts, queue.tokens) / queue.drafts
    # A step's cost is linear, so a draft's share of it with j more drafts that score k1 tokens each (k1: the queue's
    # mean) is c1 + c2 k1 + (c0 + c2 prefill) / (drafts + j): monotone in j. The cheapest step therefore takes every
    # arrival that can still join (due before the deadline, within the step's draft limit), or none; found by
    # bisection, not by pricing each arrival in turn (O(log N), not O(N) Python calls: issue 22).
    reachable = min(bisect.bisect_right(expected, deadline), policy.max_drafts - queue.drafts)
    best_joined = reachable if cost.coef[0] + cost.coef[2] * queue.prefill_tokens > 0 else 0
    drafts = queue.drafts + best_joined
    best_cost = cost.predict(drafts, round(queue.tokens + best_joined * tokens_per_draft)) / drafts
    if not best_joined or best_cost > now_cost * (1 - policy.min_gain):
        return STEP_NOW
    weighed = len(gaps_s) == len(expected)
    if weighed and _onto_longer_rounds(queue, expected[:best_joined], gaps_s[:best_joined], cost, now_s):
        return STEP_NOW
    round_s = max(queue.gaps_s / queue.drafts, *gaps_s[:best_joined]) if weighed else float("inf")
    # As the awaited drafts arrive, the queue's own step gets cheaper a draft (by fixed / q) while the awaited step's
    # price stays: past q_stop = fixed / (best / (1 - min_gain) - per draft) queued, waiting on stops paying min_gain.
    marginal = best_cost / (1 - policy.min_gain) - cost.coef[1] - cost.coef[2] * tokens_per_draft
    fixed = cost.coef[0] + cost.coef[2] * queue.prefill_tokens
    stop_at = int(fixed / marginal) + 1 if marginal > 0 and fixed < marginal * drafts else drafts  # no overflow
    return Plan(min(max(expected[best_joined - 1] - now_s, 0.0002), deadline - now_s),
                max(1, min(best_joined, stop_at - queue.drafts)), round_s)


@dataclass
class WakeGate:
    """Which arrivals are worth a new decision while the scheduler waits (issue 22: the service's own work a round).

    Re-deciding at every arrival made the scheduler's work O(N) a draft (every queued draft ordered, every
    expected arrival predicted): at N = 128 about 5% of the verifier's CPU on a Zen 5 core. A wait's decision
    stands until the wake-up timer (the awaited arrivals' predicted time) unless an arrival brings news: the queue
    reaches the size at which the decision said to look again (``Plan.joined``: the drafts awaited, or fewer where
    stepping starts to pay before they all come), nobody is expected any more (every active session queued: step at
    once), or the arrival's round is longer by ``ROUND_MARGIN`` than any the decision weighed (a slow drafter's
    draft, which ``_onto_longer_rounds`` may step at once rather than make wait out a fast convoy). Any other
    arrival joins the queue without a decision. Unarmed (a wait for nothing in particular: the queue empty or held,
    or a step running), every arrival wakes it. On simulated fleets the gated scheduler steps as the per-arrival
    one does from a tenth to a half of the decisions (``tests/test_scheduler.py``)."""

    ROUND_MARGIN = 1.25
    _at_drafts: int | None = None
    _round_s: float = float("inf")

    def arm(self, queued: int, plan: Plan) -> None:
        """Before waiting on ``plan``, decided with ``queued`` drafts queued."""
        if plan.joined:
            self._at_drafts = queued + plan.joined
            self._round_s = plan.round_s * self.ROUND_MARGIN
        else:
            self._at_drafts = None

    def disarm(self) -> None:
        self._at_drafts = None

    def wakes(self, queued: int, gap_s: float, expected: int) -> bool:
        """Whether an arrival (``queued`` drafts queued with it, its session's ``gap_s``, ``expected`` sessions
        still expected) calls for a new decision."""
        return self._at_drafts is None or queued >= self._at_drafts or expected == 0 or gap_s > self._round_s


def _onto_longer_rounds(queue: QueueState, joining: Sequence[float], gaps_s: Sequence[float], cost: StepCost,
                        now_s: float) -> bool:
    """Whether waiting for ``joining`` (their arrival times and gaps) moves more delay onto the sessions with the
    longer rounds than the server time it saves.

    Waiting ``w`` for the last of them delays the queued drafts by ``w`` plus what the joiners add to the step;
    each joiner's verdict moves by the merged step less the rest of this step and the step of its own it would
    otherwise have had; the server saves ``S``, a step's fixed cost. With d_i that change for each of the n
    sessions and R_i its round (its gap, drafting and network, plus a step), the wait moves
    sum_i (R_i - mean R) d_i of round-weighted delay onto the longer rounds; it is declined when that exceeds
    S n mean R, the same saving given to every one of them. A session's rate is its tokens per round, so a
    draft of a slow drafter (40 ms a token: a round several times a fast device's) that would wait out a convoy
    of fast ones, on top of the rest of the step it arrived during, steps now instead; between sessions of like
    rounds the sum is about zero and the wait stands on the step's cost alone (convoys still merge)."""
    step_s = cost.predict(queue.drafts, queue.tokens)
    k1 = (queue.tokens - queue.prefill_tokens) / queue.drafts
    joined = len(joining)
    wait_s = joining[-1] - now_s
    merged_s = cost.predict(queue.drafts + joined, round(queue.tokens + joined * k1))
    alone_s = cost.predict(joined, round(joined * k1))  # the joiners' own step, had this one not waited
    queued_delay_s = wait_s + merged_s - step_s
    joiner_delay_s = merged_s - alone_s - max(step_s - wait_s, 0.0)
    saved_s = step_s + alone_s - merged_s
    rounds = [gap + step_s for gap in gaps_s]
    queued_round_s = queue.gaps_s / queue.drafts + step_s  # the queued drafts share d_i: their mean round is exact
    mean_round_s = (queue.drafts * queued_round_s + sum(rounds)) / (queue.drafts + joined)
    shift = queue.drafts * (queued_round_s - mean_round_s) * queued_delay_s \
        + sum(r - mean_round_s for r in rounds) * joiner_delay_s
    return shift > saved_s * (queue.drafts + joined) * mean_round_s


def batch_size(policy: SchedulePolicy, costs: Sequence[int]) -> int:
    """How many queued drafts (oldest first, ``costs`` = tokens each) fit one step; at least one."""
    total = 0
    for count, cost in enumerate(costs):
        if count == policy.max_drafts or (count > 0 and total + cost > policy.max_tokens):
            return count
        total += cost
    return len(costs)
