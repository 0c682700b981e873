"""The verifier's draft queue on its own: one draft per session, bounded, oldest first, deferred at the head.
No event loop, no model: drafts are plain dataclasses and time is an argument."""

from __future__ import annotations

import pytest

from sled_protocol import Draft
from sled_verifier.draft_queue import DraftQueue, Offer


def draft(session: str, seq: int = 0, k: int = 2, device: str = "dev", context: int | None = None) -> Draft:
    return Draft(device, session, seq, base_len=context or 5, tokens=tuple(range(k)), max_len=100, vocab="v",
                 context=tuple(range(context)) if context else None)


def keys(taken) -> list[tuple[str, int]]:
    return [(q.draft.session_id, q.draft.seq) for q in taken]


def test_taken_oldest_first_with_arrival_times():
    queue = DraftQueue(max_drafts=8)
    for i, name in enumerate("abc"):
        assert queue.offer(draft(name), now_s=float(i)) is Offer.QUEUED
    taken = queue.take(2)
    assert keys(taken) == [("a", 0), ("b", 0)] and [q.arrival_s for q in taken] == [0.0, 1.0]
    assert len(queue) == 1 and keys(queue.take(5)) == [("c", 0)] and queue.take(1) == []


def test_a_newer_round_replaces_the_queued_one_in_place_and_keeps_its_arrival():
    queue = DraftQueue(max_drafts=8)
    queue.offer(draft("a", seq=1), now_s=0.0)
    queue.offer(draft("b"), now_s=1.0)
    assert queue.offer(draft("a", seq=2, k=5), now_s=2.0) is Offer.QUEUED
    taken = queue.take(2)
    assert keys(taken) == [("a", 2), ("b", 0)]          # a's newer round, still first in line
    assert taken[0].arrival_s == 0.0 and taken[0].draft.tokens == tuple(range(5))


def test_an_older_round_arriving_late_is_dropped():
    queue = DraftQueue(max_drafts=8)
    queue.offer(draft("a", seq=3), now_s=0.0)
    assert queue.offer(draft("a", seq=2), now_s=1.0) is Offer.LATE
    assert keys(queue.take(5)) == [("a", 3)]


def test_sessions_are_per_device():
    queue = DraftQueue(max_drafts=8)
    queue.offer(draft("same", seq=4, device="d1"), now_s=0.0)
    assert queue.offer(draft("same", seq=1, device="d2"), now_s=1.0) is Offer.QUEUED  # not "late": another device's
    assert [(q.draft.device_id, q.draft.seq) for q in queue.take(5)] == [("d1", 4), ("d2", 1)]


def test_full_refuses_new_sessions_but_not_newer_rounds():
    queue = DraftQueue(max_drafts=2)
    queue.offer(draft("a"), now_s=0.0)
    queue.offer(draft("b"), now_s=0.0)
    assert queue.offer(draft("c"), now_s=1.0) is Offer.FULL
    assert queue.offer(draft("a", seq=1), now_s=1.0) is Offer.QUEUED  # replaces, takes no new place
    assert len(queue) == 2 and ("dev", "c") not in queue


def test_drop_forgets_the_session():
    queue = DraftQueue(max_drafts=2)
    queue.offer(draft("a"), now_s=0.0)
    queue.drop(("dev", "a"))
    queue.drop(("dev", "never"))  # nothing queued: nothing to do
    assert len(queue) == 0 and queue.offer(draft("a", seq=0), now_s=1.0) is Offer.QUEUED


def test_deferred_drafts_go_back_to_the_head_in_order_unless_a_newer_round_came():
    queue = DraftQueue(max_drafts=8)
    for i, name in enumerate("abcd"):
        queue.offer(draft(name), now_s=float(i))
    taken = queue.take(3)                                    # a, b, c run; all three deferred
    queue.offer(draft("e"), now_s=9.0)
    queue.offer(draft("b", seq=1), now_s=9.5)                # b's next round arrived during the step
    queue.requeue(taken)
    after = queue.take(10)
    assert keys(after) == [("a", 0), ("c", 0), ("d", 0), ("e", 0), ("b", 1)]
    assert [q.arrival_s for q in after] == [0.0, 2.0, 3.0, 9.0, 9.5]


def test_state_is_what_the_scheduler_weighs():
    queue = DraftQueue(max_drafts=8)
    assert queue.state(idle_since_s=4.0, prefill_budget=256) == queue.state(0.0, 1)  # empty: nothing ready
    assert queue.state(4.0, 256).ready_since_s is None and queue.state(4.0, 256).drafts == 0
    queue.offer(draft("a", k=3), now_s=1.0)
    queue.offer(draft("b", k=1, context=300), now_s=2.0)
    queue.offer(draft("c", k=0, context=40), now_s=3.0)
    assert queue.scored_tokens() == [4, 2, 1]
    state = queue.state(idle_since_s=0.5, prefill_budget=256)
    assert (state.drafts, state.prefill_tokens, state.tokens) == (3, 256, 7 + 256)  # prefill capped at the budget
    assert state.ready_since_s == 1.0                                                 # the oldest arrival
    assert queue.state(idle_since_s=5.0, prefill_budget=1000).ready_since_s == 5.0   # the model was busy until then
    assert queue.state(5.0, 1000).prefill_tokens == 340
    gaps = {"a": 0.02, "b": 0.16, "c": 0.03}  # each session's rounds outside the verifier (Arrivals.gap_s)
    assert queue.state(5.0, 1000, gap_of=lambda key: gaps[key[1]]).gaps_s == pytest.approx(0.21)
    assert queue.state(5.0, 1000).gaps_s == 0.0
