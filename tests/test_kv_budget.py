"""The KV memory budget (issue 19, item 4) and the Close/deferred race (issue 19, smaller holes), with the real
engine on the tiny target: the store is reserved at start within its budget and never reallocated, a budget that
cannot hold one session at the context limit is refused at start (exit 78), a full store answers OVERLOADED,
Status says how many sessions can still open, and a Close during a deferred first round leaves no zombie."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import ROOT, serving
from sled_protocol import Close, Draft, ErrorCode, VerdictKind, encode, topics
from sled_protocol.transport import parse_broker_url, transport_for
from sled_protocol.vocab import vocab_hash
from sled_verifier.engine import KVBudgetError, OutcomeKind, Quotas, VerifierEngine
from sled_verifier.runtime import load_target
from sled_verifier.stats import VerifierStats

CONTEXT = 512


@pytest.fixture(scope="module")
def target(tiny_models):
    return load_target(tiny_models.target, "transformers", device="cpu")


def first_round(device: str, session: str, length: int = 40, max_len: int = CONTEXT) -> Draft:
    rng = random.Random(hash((device, session)) % 1000)
    return Draft(device, session, 0, base_len=length, tokens=(5, 6), max_len=max_len, vocab="v",
                 context=tuple(rng.randrange(3, 500) for _ in range(length)))


def per_session_bytes(target) -> int:
    probe = VerifierEngine(target, "v", max_sessions=1, stats=VerifierStats(), max_context=CONTEXT)
    return probe.kv.bytes_per_token() * CONTEXT


def test_the_store_is_reserved_within_the_budget_and_never_grows(target):
    per_session = per_session_bytes(target)
    engine = VerifierEngine(target, "v", max_sessions=64, stats=VerifierStats(), max_context=CONTEXT,
                            kv_budget_bytes=3 * per_session + per_session // 2)  # two sessions and the padding slot
    assert engine.kv.max_slots == 2 and engine.free_sessions == 2 and engine.kv.total_bytes <= 3.5 * per_session
    tensors = [id(t) for t in engine.kv.keys + engine.kv.values]
    outcomes = engine.step_until_answered([first_round("a", "a", 300), first_round("b", "b", 20)])
    assert [o.verdict.kind for o in outcomes] == [VerdictKind.VERIFIED] * 2 and engine.free_sessions == 0
    [refused] = engine.step([first_round("c", "c")])  # another device, both sessions active: no room
    assert refused.kind is OutcomeKind.REFUSED and refused.verdict.error is ErrorCode.OVERLOADED
    assert engine.close("a", "a") and engine.free_sessions == 1
    [opened] = engine.step_until_answered([first_round("c", "c")])
    assert opened.verdict.kind is VerdictKind.VERIFIED
    assert [id(t) for t in engine.kv.keys + engine.kv.values] == tensors  # the same memory throughout
    assert engine.kv.length <= CONTEXT and engine.stats.refused_sessions == 1


def test_a_budget_below_one_session_at_the_context_limit_is_refused(target):
    per_session = per_session_bytes(target)
    with pytest.raises(KVBudgetError, match="cannot hold one session of 512 tokens"):
        VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats(), max_context=CONTEXT,
                       kv_budget_bytes=2 * per_session - 1)


def test_the_verifier_refuses_to_start_on_such_a_budget(tiny_models):
    done = subprocess.run([sys.executable, "-m", "sled_verifier", "--target", str(tiny_models.target),
                           "--mqtt-url", "memory://nowhere", "--metrics-port", "0", "--threads", "1",
                           "--kv-memory", "64KiB"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 78, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "bad_configuration" in line]
    assert len(lines) == 1 and "cannot hold one session" in lines[0] and "--kv-memory" in lines[0]


class GatedEngine:
    """The engine, its third step held at the gate until the test opens it (the step is then in flight)."""

    def __init__(self, engine: VerifierEngine) -> None:
        self.engine, self.steps = engine, 0
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, drafts, active=()):
        self.steps += 1
        if self.steps == 3:
            self.entered.set()
            self.gate.wait(30)
        return self.engine.step(drafts, active)


@pytest.mark.asyncio
async def test_a_close_during_a_deferred_first_round_leaves_no_zombie(tiny_models, target):
    from sled_verifier.config import VerifierConfig
    from sled_verifier.service import VerifierService

    name = f"race-{uuid.uuid4().hex[:8]}"
    url = f"memory://{name}"
    config = VerifierConfig(target=str(tiny_models.target), mqtt_url=url, verifier_id="race", metrics_port=0)
    quotas = Quotas(prefill_chunk=16, max_prefill=16, device_prefill=16)  # 300 tokens: ~19 deferred steps
    engine = GatedEngine(VerifierEngine(target, "race", max_sessions=4, stats=VerifierStats(), max_context=CONTEXT,
                                        quotas=quotas))
    service = VerifierService(config, engine, vocab_hash(tiny_models.target))
    async with serving(service):
        try:
            async with transport_for(parse_broker_url(url)).connect("dev") as device:
                await device.subscribe(topics.verdict_topic("dev"), qos=topics.QOS_VERDICT)
                draft = Draft("dev", "s", 0, base_len=300, tokens=(5,), max_len=CONTEXT, vocab=service.vocab,
                              context=tuple(range(3, 303)))
                await device.publish(topics.draft_topic("race", "dev"), encode(draft))
                assert await asyncio.to_thread(engine.entered.wait, 30)  # step 3 holds the deferred first round
                await device.publish(topics.draft_topic("race", "dev"), encode(Close("dev", "s")))
                while ("dev", "s") not in service.queue._closed:
                    await asyncio.sleep(0.01)
                engine.gate.set()
                for _ in range(200):  # the step ends, the close runs; nothing may reopen the session
                    await asyncio.sleep(0.02)
                    if engine.engine.sessions.get("dev", "s") is None and not len(service.queue):
                        break
                steps = engine.steps
                await asyncio.sleep(0.3)
                assert engine.steps == steps and len(service.queue) == 0  # no step ran after: nothing requeued
                assert engine.engine.sessions.get("dev", "s") is None
                assert len(engine.engine.kv.free) == engine.engine.kv.capacity  # its KV slot is free
        finally:
            engine.gate.set()  # before the service is cancelled: the step thread may still wait on it
