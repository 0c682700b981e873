"""When to run the next batched verification: a pure policy over the queue and a clock.

Flush when the batch is full (drafts or tokens), or when the model is idle and either the oldest draft
has waited ``window_ms`` or nothing else is coming (every session we expect a draft from has sent one).
Waiting only ever happens while the model is idle and a straggler may still arrive; a busy model lets
the queue fill by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    window_ms: float = 4.0
    max_drafts: int = 32
    max_tokens: int = 512


@dataclass(frozen=True)
class QueueView:
    drafts: int
    tokens: int                  # tokens the forward pass would score: sum of (k_i + 1)
    oldest_arrival_s: float | None
    expected_drafts: int         # active sessions whose next draft has not arrived yet


def flush_delay_s(policy: BatchPolicy, queue: QueueView, now_s: float, model_idle: bool) -> float | None:
    """0.0: flush now; > 0: look again after that many seconds; None: wait for the next arrival or idle."""
    if queue.drafts == 0 or not model_idle:
        return None
    if queue.drafts >= policy.max_drafts or queue.tokens >= policy.max_tokens or queue.expected_drafts == 0:
        return 0.0
    waited_s = now_s - (queue.oldest_arrival_s if queue.oldest_arrival_s is not None else now_s)
    return max(0.0, policy.window_ms / 1000.0 - waited_s)


def take_batch(policy: BatchPolicy, costs: Sequence[int]) -> int:
    """How many queued drafts (oldest first, ``costs`` = tokens each) fit one batch; at least one."""
    total = 0
    for count, cost in enumerate(costs):
        if count == policy.max_drafts or (count > 0 and total + cost > policy.max_tokens):
            return count
        total += cost
    return len(costs)
