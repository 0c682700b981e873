"""Per-device quotas and fairness (issue 19, item 3), on the pure queue and session table: no model, no loop."""

from __future__ import annotations

import pytest

from sled_protocol import Draft
from sled_verifier.config import VerifierConfig, parse_memory
from sled_protocol.config import ConfigError
from sled_verifier.draft_queue import DraftQueue, Offer
from sled_verifier.fairshare import FairShare
from sled_verifier.scheduler import SchedulePolicy, StepCost, batch_size, delay_s
from sled_verifier.sessions import SessionTable


def draft(device: str, session: str, seq: int = 0, context: int | None = 8) -> Draft:
    return Draft(device, session, seq, base_len=context or 8, tokens=(1, 2, 3), max_len=100, vocab="v",
                 context=tuple(range(context)) if context else None)


def devices(taken) -> list[str]:
    return [q.draft.device_id for q in taken]


def test_a_device_with_200_queued_drafts_does_not_delay_one_with_one():
    queue = DraftQueue(max_drafts=512, device_max_drafts=256)
    for i in range(200):
        assert queue.offer(draft("flood", f"f{i}"), now_s=i * 0.001) is Offer.QUEUED
    queue.offer(draft("honest", "h"), now_s=1.0)  # arrived last
    policy = SchedulePolicy(max_drafts=4)
    taken = queue.take(batch_size(policy, queue.scored_tokens()))
    assert devices(taken) == ["flood", "honest", "flood", "flood"]  # one place per device per round
    assert [q.draft.session_id for q in taken if q.draft.device_id == "flood"] == ["f0", "f1", "f2"]  # oldest first


def test_round_robin_takes_devices_in_the_order_of_their_oldest_draft():
    queue = DraftQueue(max_drafts=16)
    for now_s, (device, session) in enumerate([("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1"), ("a", "a2")]):
        queue.offer(draft(device, session), now_s=float(now_s))
    assert [q.draft.session_id for q in queue.fair_order()] == ["b1", "a1", "c1", "b2", "a2"]
    assert queue.scored_tokens() == [4] * 5


def test_a_device_at_its_queued_quota_is_refused_others_are_not():
    queue = DraftQueue(max_drafts=16, device_max_drafts=2)
    assert [queue.offer(draft("x", f"s{i}"), now_s=0.0) for i in range(3)] == [Offer.QUEUED, Offer.QUEUED,
                                                                                 Offer.DEVICE_FULL]
    assert queue.offer(draft("x", "s0", seq=1), now_s=1.0) is Offer.QUEUED  # a newer round takes no new place
    assert queue.offer(draft("y", "t"), now_s=1.0) is Offer.QUEUED and queue.queued_of("x") == 2
    taken = queue.take(1)
    assert queue.queued_of("x") == 1 and queue.offer(draft("x", "s2"), now_s=2.0) is Offer.QUEUED
    queue.requeue(taken)  # a deferred draft goes back even past the quota: it was admitted once
    assert queue.queued_of("x") == 3


def test_a_session_closed_during_its_step_is_not_requeued():
    """The Close/deferred race: the first round is deferred (prefill in progress) while its Close arrives."""
    queue = DraftQueue(max_drafts=8)
    queue.offer(draft("d", "closing"), now_s=0.0)
    queue.offer(draft("d", "staying"), now_s=0.0)
    taken = queue.take(2)                    # the step runs; both deferred
    queue.drop(("d", "closing"))             # the Close arrives meanwhile
    queue.requeue(taken)
    assert [q.draft.session_id for q in queue.take(5)] == ["staying"]
    queue.requeue([])
    queue.offer(draft("d", "closing", seq=1), now_s=1.0)  # a later step is not affected by an old close
    assert len(queue) == 1


def open_session(table: SessionTable, device: str, session: str, now_s: float = 0.0, protected=frozenset()):
    state, displaced = table.open(draft(device, session), now_s, protected)
    return state, [(s.device, s.session_id) for s in displaced]


def test_a_device_at_its_session_quota_is_refused_unless_one_of_its_own_is_done():
    table = SessionTable(max_sessions=100, device_max_sessions=3, idle_s=60.0)
    for i in range(3):
        open_session(table, "flood", f"f{i}")
    open_session(table, "honest", "h")
    state, displaced = open_session(table, "flood", "f3", 2.0)
    assert state is None and displaced == [] and table.held_by("flood") == 3  # its live sessions stay, no churn
    table.get("flood", "f1").finished = True
    state, displaced = open_session(table, "flood", "f3", 3.0)
    assert state is not None and displaced == [("flood", "f1")]
    table.touch(table.get("flood", "f2"), 50.0)
    table.touch(table.get("flood", "f3"), 50.0)
    state, displaced = open_session(table, "flood", "f4", 70.0)  # f0 silent for 70 s: its device vanished
    assert state is not None and displaced == [("flood", "f0")] and table.get("honest", "h") is not None
    table.get("flood", "f4").finished = True
    state, _ = open_session(table, "flood", "f5", 71.0, protected=frozenset({("flood", "f4")}))
    assert state is None  # its only evictable session is in this step


def test_one_device_adds_at_most_its_step_tokens_to_a_step():
    queue = DraftQueue(max_drafts=64, device_max_drafts=32, device_step_tokens=10)
    for i in range(8):
        queue.offer(draft("many", f"m{i}"), now_s=0.0)  # 4 tokens each
    queue.offer(draft("one", "o"), now_s=1.0)
    assert [q.draft.session_id for q in queue.fair_order()] == ["m0", "o", "m1"]  # 8 of 10 tokens; a third: 12
    assert queue.state(idle_since_s=0.0, prefill_budget=0).drafts == 3
    taken = queue.take(3)
    queue.requeue([])
    assert len(taken) == 3 and [q.draft.session_id for q in queue.fair_order()] == ["m2", "m3"]
    big = DraftQueue(max_drafts=8, device_step_tokens=2)
    big.offer(draft("d", "x"), now_s=0.0)
    assert len(big.fair_order()) == 1  # a device's first draft always goes, whatever its size


def test_a_full_table_never_evicts_a_device_within_its_quota():
    table = SessionTable(max_sessions=4, device_max_sessions=2, idle_s=60.0)
    for device in ("a", "b"):
        for i in range(2):
            open_session(table, device, f"{device}{i}")
    state, displaced = open_session(table, "c", "c0", 10.0)
    assert state is None and displaced == [] and len(table) == 4  # all active and within quota: overloaded
    table.get("b", "b1").finished = True
    state, displaced = open_session(table, "c", "c0", 11.0)
    assert state is not None and displaced == [("b", "b1")]      # a finished session holds no KV: it goes first
    state, displaced = open_session(table, "d", "d0", 100.0)    # everyone idle past 60 s: the most-holding device
    assert state is not None and displaced == [("a", "a0")]


def test_the_quota_defaults_and_the_memory_sizes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = VerifierConfig(target=str(tmp_path), verifier_id="v")
    assert (config.device_max_sessions, config.device_max_drafts, config.prefill_chunk_tokens,
            config.device_prefill_tokens, config.max_prefill_tokens, config.kv_memory, config.device_step_tokens) \
        == (16, 16, 64, 64, 256, "50%", 32)
    assert parse_memory("2GiB", 0) == 2 * 2**30 and parse_memory("512MB", 0) == 512 * 10**6
    assert parse_memory("25%", free_bytes=4000) == 1000 and parse_memory("1000", 0) == 1000
    for bad in ("lots", "0%", "150%", "2XB", "0"):
        with pytest.raises(ConfigError, match="kv_memory"):
            parse_memory(bad, 1000)
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        VerifierConfig(target=str(tmp_path), verifier_id="v", prefill_chunk_tokens=128, device_prefill_tokens=64)
    with pytest.raises(ConfigError, match="kv_memory"):
        VerifierConfig(target=str(tmp_path), verifier_id="v", kv_memory="a lot")


def test_a_device_that_spent_more_than_its_share_of_time_on_prefill_waits_while_others_have_work():
    """Deficit round robin over seconds: each active device is credited an equal part of every step; prefill
    seconds are debited. The flooder's 30 ms chunk buys it a wait of 8 steps of 10 ms among four devices."""
    fair = FairShare()
    active = {"flood", "a", "b", "c"}
    assert fair.may_prefill("flood", active)                        # nobody has spent anything yet
    fair.charge(active, step_s=0.040, spent_s={"flood": 0.030})   # its chunk made the step 4x longer
    waited = 0
    while not fair.may_prefill("flood", active):
        assert fair.may_prefill("a", active)                        # an honest device's own prefill goes at once
        fair.charge(active, step_s=0.010, spent_s={})
        waited += 1
    assert waited == 8  # 30 ms of debt at 2.5 ms a step, after the 10 ms it earned in its own step
    fair.charge(active, step_s=0.040, spent_s={"flood": 0.030})
    assert not fair.may_prefill("flood", active) and fair.may_prefill("flood", {"flood"})  # alone: all its own
    fair.charge({"a"}, step_s=10.0, spent_s={})
    assert fair.credit("a") == fair.cap_s                           # a quiet device banks a bounded credit


def test_a_device_over_its_share_adds_one_draft_and_rides_along_others_steps():
    """Extra drafts are paid from the fair share too: a device in debt while others have work adds its first
    draft only, and a queue of its drafts alone waits the whole budget for another device's step to join."""
    fair = FairShare()
    active = {"flood", "honest"}
    fair.charge(active, step_s=0.010, spent_s={"flood": 0.008})  # its extra drafts took most of the step
    assert fair.over_share({"flood", "honest"}, active) == {"flood"}
    assert fair.over_share({"flood"}, {"flood"}) == frozenset()  # alone: all the verifier's time is its own
    queue = DraftQueue(max_drafts=64, device_max_drafts=32, device_step_tokens=32)
    for i in range(6):
        queue.offer(draft("flood", f"f{i}"), now_s=0.0)
    queue.over_share(fair.over_share(queue.devices(), active))
    state = queue.state(idle_since_s=1.0, prefill_budget=0)
    assert state.drafts == 1 and state.held  # one draft, and no step of its own before the budget is out
    single = DraftQueue(max_drafts=8)
    single.offer(draft("honest", "h"), now_s=0.0)
    single.over_share(frozenset({"honest"}))
    assert not single.state(1.0, 0).held  # one round in flight (say, in debt for its prompt): never held
    policy = SchedulePolicy(max_wait_s=0.050)
    assert delay_s(policy, state, [1.001], StepCost(), now_s=1.0) == pytest.approx(0.050)
    assert delay_s(policy, state, [], StepCost(), now_s=1.060) == 0.0  # budget out: it steps on its own
    queue.offer(draft("honest", "h"), now_s=1.01)
    queue.over_share(fair.over_share(queue.devices(), active))
    assert not queue.state(1.0, 0).held and devices(queue.fair_order()) == ["honest", "flood"]  # rides along, after
    queue.over_share(frozenset())
    assert devices(queue.fair_order()) == ["flood", "honest", *["flood"] * 5]  # in credit: all six (24 tokens)


def test_a_step_of_one_draft_takes_a_device_in_credit_before_a_deferred_one():
    """--max-batch-drafts 1 (bench/run.py's no-batching mode): a device in debt has a new session's draft at the
    head (deferred: its prefill waits for the others' sake). Taken first again, it would be deferred again, and
    the others' drafts never ran: the verifier stalled with seven sessions queued (bench/run.py on SmolLM2)."""
    fair = FairShare()
    active = {"newcomer", "honest"}
    fair.charge(active, step_s=0.010, spent_s={"newcomer": 0.009})  # its prefill took most of the step
    queue = DraftQueue(max_drafts=64)
    queue.offer(draft("newcomer", "n1"), now_s=0.0)
    queue.offer(draft("honest", "h1"), now_s=0.5)
    taken = queue.take(1)
    queue.requeue(taken)                                          # deferred: back at the head
    queue.over_share(fair.over_share(queue.devices(), active))
    assert devices(queue.take(1)) == ["honest"]                   # the device in credit goes first
    fair.charge(active, step_s=0.050, spent_s={})                 # its step credits both devices
    queue.over_share(fair.over_share(queue.devices(), active))
    assert devices(queue.take(1)) == ["newcomer"]


def test_a_device_spending_while_alone_banks_nothing():
    """Alone, a device is credited the whole step and debited only its chunks: it must not bank the rest and
    spend it on prefill when honest devices arrive. A device that banked while it only decoded keeps its burst."""
    fair = FairShare()
    for _ in range(100):
        fair.charge({"flood"}, step_s=0.020, spent_s={"flood": 0.012})
    assert fair.credit("flood") == 0.0
    for _ in range(100):
        fair.charge({"flood", "honest"}, step_s=0.010, spent_s={})
    assert fair.credit("honest") == fair.cap_s
    fair.charge({"flood", "honest"}, step_s=0.020, spent_s={"honest": 0.012})
    assert fair.credit("honest") == pytest.approx(fair.cap_s - 0.012)  # its bank pays for its prefill


def test_first_rounds_alone_step_at_once():
    """A queue of sessions' first rounds only steps at once (their prefill is a forward of its own: rounds
    merged into it would only wait for it)."""
    queue = DraftQueue(max_drafts=8)
    queue.offer(draft("a", "a0"), now_s=1.0)  # a context: a session's first round
    state = queue.state(idle_since_s=1.0, prefill_budget=256)
    assert state.prefill_only
    policy = SchedulePolicy(max_wait_s=0.050)
    assert delay_s(policy, state, [1.001, 1.002], StepCost(), now_s=1.0) == 0.0
    queue.offer(draft("b", "b0", seq=3, context=None), now_s=1.0)
    assert not queue.state(1.0, 256).prefill_only


def test_devices_that_all_spend_beside_each_other_are_never_all_held():
    """``make load`` found it: eight devices each decoding several sessions all spend on their extra drafts in
    every step; spending less than their part, they keep their credit, and were they all in debt, no one is held
    (there would be no one to ride along with: the verifier would idle max_wait between steps)."""
    fair = FairShare()
    active = {f"d{i}" for i in range(8)}
    for _ in range(200):
        fair.charge(active, step_s=0.016, spent_s={device: 0.001 for device in active})  # 1 ms of each 2 ms share
    assert all(fair.credit(device) > 0.0 for device in active)
    assert fair.over_share(active, active) == frozenset()
    for _ in range(100):
        fair.charge(active, step_s=0.008, spent_s={device: 0.010 for device in active})  # all beyond their share
    assert all(fair.credit(device) < 0.0 for device in active)
    assert fair.over_share(active, active) == frozenset()  # all in debt: nobody to ride along with
    fair.charge(active | {"quiet"}, step_s=0.009, spent_s={})
    assert fair.over_share(active, active | {"quiet"}) == active  # one in credit: the others ride along its steps
