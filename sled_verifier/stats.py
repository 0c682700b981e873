"""Verification counters, kept as a pure object; logging and export live elsewhere.

The acceptance counts are ``sled_protocol.acceptance.AcceptanceCounts`` (vLLM's definitions; a round is one
verified draft), as on the edge.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

from sled_protocol.acceptance import AcceptanceCounts


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus style) with fixed upper bounds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.observations += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BOUNDS = (8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# Queue delay is the scheduler's SLO: fine buckets up to its deadline (--max-wait-ms, default 50) and past it.
DELAY_BOUNDS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04,
                0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class VerifierStats(AcceptanceCounts):
    prefill_s: float = 0.0             # model time of prefill forwards
    busy_s: float = 0.0                # service time from taking a batch to its verdicts published
    step_s: float = 0.0                # engine step time (admission, prefill, forward, verification, commit)
    decide_s: float = 0.0              # verification maths and commit of each row, in the engine step
    receive_s: float = 0.0             # decoding and admitting inbound messages (MQTT and codec)
    publish_s: float = 0.0             # encoding and publishing verdicts (MQTT and codec)
    schedule_s: float = 0.0            # the scheduler's decisions (arrival prediction, cost model)
    deferred: int = 0                  # drafts held over to the next step while their prefill completes
    evictions: int = 0                 # sessions evicted for another one (sled_verifier.sessions)
    refused_sessions: int = 0          # new sessions refused as overloaded: no room without evicting within quota
    prefill_tokens: int = 0
    resyncs: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    refusals_suppressed: int = 0       # refusals over a device's refusal budget: counted, not answered or logged
    retained_ignored: int = 0          # retained messages on drafts topics (planted, stale): never processed
    batch_size_hist: Histogram = field(default_factory=lambda: Histogram(SIZE_BOUNDS))
    batch_tokens_hist: Histogram = field(default_factory=lambda: Histogram(TOKEN_BOUNDS))
    forward_hist: Histogram = field(default_factory=lambda: Histogram(SECONDS_BOUNDS))
    queue_delay_hist: Histogram = field(default_factory=lambda: Histogram(DELAY_BOUNDS))
    added_wait_hist: Histogram = field(default_factory=lambda: Histogram(DELAY_BOUNDS))
    loop_thread: int | None = None     # the service's event-loop thread (``threading.get_ident``), once it runs

    def loop_cpu_s(self) -> float:
        """CPU seconds of the service's event-loop thread so far: receiving, decoding, admitting, scheduling and
        publishing, all its work outside the model thread (CPU, not the wall time its awaits took); 0.0 before
        it runs or where the platform has no per-thread clock."""
        if self.loop_thread is None:
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.loop_thread))
        except (AttributeError, OSError):  # no per-thread clocks here, or the thread has ended
            return 0.0

    def outside_model_s(self) -> float:
        """The service's own seconds so far outside the model's forwards: the event loop's CPU (where no thread
        clock exists, the wall time of its receive, publish and schedule work) and each step's bookkeeping."""
        loop_s = self.loop_cpu_s() or self.receive_s + self.publish_s + self.schedule_s
        return loop_s + max(0.0, self.step_s - self.forward_s - self.prefill_s)

    def record_batch(self, size: int, forward_s: float, tokens: int = 0) -> None:
        self.batch_size_hist.observe(size)
        self.batch_tokens_hist.observe(tokens)
        self.forward_hist.observe(forward_s)

    def record_queue_delay(self, delay_s: float, added_s: float = 0.0) -> None:
        """``delay_s``: arrival to step; ``added_s``: the part the scheduler chose (the model was idle)."""
        self.queue_delay_hist.observe(delay_s)
        self.added_wait_hist.observe(max(0.0, added_s))

    @property
    def batches(self) -> int:
        return self.batch_size_hist.observations

    @property
    def forward_s(self) -> float:
        """Model time of verification forwards."""
        return self.forward_hist.total

    def summary(self) -> dict[str, object]:
        return {
            "drafts": self.rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_acceptance_length": round(self.mean_acceptance_length, 3),
            "acceptance_rate": round(self.acceptance_rate, 3),
            "batches": self.batches,
            "mean_batch_size": round(self.rounds / self.batches, 2) if self.batches else 0.0,
            "forward_s": round(self.forward_s, 3),
            "prefill_s": round(self.prefill_s, 3),
            "busy_s": round(self.busy_s, 3),
            "overhead": round(1 - (self.forward_s + self.prefill_s) / self.busy_s, 3) if self.busy_s else 0.0,
            "prefill_tokens": self.prefill_tokens,
            "resyncs": self.resyncs,
            "evictions": self.evictions,
            "refused_sessions": self.refused_sessions,
            "errors": dict(self.errors),
            "refusals_suppressed": self.refusals_suppressed,
            "retained_ignored": self.retained_ignored,
        }
