"""Property-based fuzzing of the wire (issue 19, item 2): the decoders, and a real verifier over the in-process
broker and over the real Mosquitto.

Properties: every decoder, ``peek_ids`` and ``sled-inspect``'s ``describe`` either decode or raise the one
``ProtocolError``, and what they decode encodes again; a real verifier answers every message whose sender is known
(all but a Close, which is never answered), never through its catch-all (a refusal "message refused: <exception>"
is an input nobody foresaw: a bug found), and stays up. The bounded run here is reproducible; a long random one:
``SLED_FUZZ_EXAMPLES=20000 pytest -s tests/test_fuzz_wire.py`` (``make fuzz``), which prints the tallies.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sled_protocol import (Close, ErrorCode, Limits, ProtocolError, VerdictKind, decode, decode_draft,
                           decode_status, decode_verdict, encode, topics)
from sled_protocol.inspect import OBSERVER_LIMITS, describe
from sled_protocol.codec import decode_inbound, peek_ids
from wirefuzz import fuzz_settings, payloads

TALLY: Counter[str] = Counter()  # printed at the end of each run (pytest -s)
DECODERS = (decode, decode_inbound, decode_draft, decode_verdict, decode_status)
LIMITS = (Limits(), Limits(vocab_size=512, max_context_tokens=1024), OBSERVER_LIMITS)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nwire fuzz tallies: {dict(sorted(TALLY.items()))}")


# -- the decoders: pure ----------------------------------------------------------------------------------------

@pytest.mark.slow
@fuzz_settings(bounded=800)
@given(payloads("fz-0", "0123456789abcdef"))
def test_every_decoder_decodes_or_raises_protocol_error_only(payload):
    TALLY["decoder_messages"] += 1
    for limits in LIMITS:
        for decoder in DECODERS:
            try:
                message = decoder(payload, limits)
            except ProtocolError as exc:
                assert isinstance(exc.code, ErrorCode)
                continue
            again = decoder(encode(message), limits)  # what decodes encodes, and decodes again
            assert type(again) is type(message)
            if not _has_floats(message):  # floats travel as float32: a float64 one comes back rounded
                assert again == message
            TALLY[f"decoded_{type(message).__name__.lower()}"] += 1
    tag, session, seq = peek_ids(payload)
    assert tag is None or isinstance(tag, str)
    assert describe("sled/v1/drafts/v/fz-0", payload, 0.0).get("error") != "internal"


def _has_floats(message) -> bool:
    return any(getattr(message, name, None) is not None for name in ("q_probs", "step_cost", "sampling"))


# -- a real verifier: the harness runs it (and the fuzzer's connection) in a loop of their own -------------------

class LoopThread:
    """An event loop in a thread, so a synchronous hypothesis test can drive asynchronous services."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Fuzzer:
    """Publishes one message at a time on a drafts topic of a fresh device and waits for that device's verdict
    (a fresh device: no session, rate or refusal state carries over from one message to the next)."""

    def __init__(self, publish, verdicts: asyncio.Queue, verifier_id: str, alive, max_packet_bytes: int = 0) -> None:
        self.publish, self.verdicts, self.verifier_id, self.alive = publish, verdicts, verifier_id, alive
        self.max_packet_bytes = max_packet_bytes  # the broker's max_packet_size: larger ones never reach a verifier

    async def send(self, device: str, payload: bytes, prefix: str) -> None:
        TALLY[f"{prefix}_messages"] += 1
        if self.max_packet_bytes and len(payload) + 200 > self.max_packet_bytes:
            TALLY[f"{prefix}_over_broker_packet_limit"] += 1  # the broker would disconnect its sender
            return
        await self.publish(topics.draft_topic(self.verifier_id, device), payload)
        if _is_close(payload):  # never answered: nothing to wait for
            TALLY[f"{prefix}_closes"] += 1
            return
        async with asyncio.timeout(30):
            while True:
                topic, data = await self.verdicts.get()
                if topic == topics.verdict_topic(device):
                    break
        verdict = decode_verdict(data)
        assert not (verdict.reason or "").startswith("message refused:"), f"the catch-all caught: {verdict.reason}"
        _, session, seq = peek_ids(payload)
        if verdict.kind is VerdictKind.ERROR and session is not None and verdict.session_id is not None:
            assert verdict.session_id == session
        TALLY[f"{prefix}_answered"] += 1
        TALLY[f"{prefix}_{verdict.error or verdict.kind}"] += 1
        assert self.alive(), "the verifier stopped"


def _is_close(payload: bytes) -> bool:
    try:
        return isinstance(decode_inbound(payload, OBSERVER_LIMITS), Close)
    except ProtocolError:
        return False


@pytest.fixture(scope="module")
def memory_fuzzer(tiny_models):
    from sled_protocol.memory import forget_broker
    from sled_protocol.transport import parse_broker_url, transport_for
    from sled_protocol.vocab import vocab_hash
    from sled_verifier.__main__ import serve
    from sled_verifier.config import VerifierConfig

    harness, name = LoopThread(), f"fuzz-{uuid.uuid4().hex[:8]}"
    config = VerifierConfig(target=str(tiny_models.target), mqtt_url=f"memory://{name}", verifier_id="fz-v", threads=1,
                            metrics_port=0)
    verdicts: asyncio.Queue = asyncio.Queue()
    held = {}

    async def start() -> None:
        ready = asyncio.Event()
        held["verifier"] = asyncio.create_task(serve(config, ready))
        await ready.wait()
        held["link_context"] = transport_for(parse_broker_url(f"memory://{name}")).connect("fuzzer")
        link = held["link"] = await held["link_context"].__aenter__()
        await link.subscribe(f"{topics.PREFIX}/verdicts/+")

        async def read() -> None:
            async for message in link.messages():
                verdicts.put_nowait((message.topic, message.payload))
        held["reader"] = asyncio.create_task(read())

    harness.run(start())
    yield harness, Fuzzer(held["link"].publish, verdicts, "fz-v", lambda: not held["verifier"].done()), \
        vocab_hash(tiny_models.target)

    async def stop() -> None:
        held["reader"].cancel()
        held["verifier"].cancel()
        await asyncio.gather(held["reader"], held["verifier"], return_exceptions=True)
        forget_broker(name)

    harness.run(stop())
    harness.close()


@pytest.mark.slow
@fuzz_settings(bounded=300)
@given(st.data())
def test_a_real_verifier_answers_every_fuzzed_message_and_stays_up(memory_fuzzer, data):
    harness, fuzzer, vocab = memory_fuzzer
    device = f"fz-{uuid.uuid4().hex[:10]}"
    harness.run(fuzzer.send(device, data.draw(payloads(device, vocab, inbound=True)), "memory"))


@pytest.fixture(scope="module")
def mosquitto_fuzzer(broker, tiny_models, tmp_path_factory):
    from conftest import ROOT, start_verifier
    from sled_protocol.mqtt import make_client
    from sled_protocol.transport import parse_broker_url
    from sled_protocol.vocab import vocab_hash

    running = start_verifier(broker, tiny_models.target, tmp_path_factory.mktemp("fuzz-logs"), "fz-mv")
    harness, verdicts, held = LoopThread(), asyncio.Queue(), {}

    async def start() -> None:
        client = held["client"] = make_client(parse_broker_url(broker.url), f"fuzzer-{uuid.uuid4().hex[:6]}")
        await client.__aenter__()
        await client.subscribe(f"{topics.PREFIX}/verdicts/+")

        async def read() -> None:
            async for message in client.messages:
                verdicts.put_nowait((str(message.topic), bytes(message.payload)))
        held["reader"] = asyncio.create_task(read())

    async def publish(topic: str, payload: bytes) -> None:
        await held["client"].publish(topic, payload)

    harness.run(start())
    max_packet = int(re.search(r"(?m)^max_packet_size (\d+)", (ROOT / "broker" / "mosquitto-dev.conf").read_text())[1])
    yield harness, Fuzzer(publish, verdicts, "fz-mv", lambda: running.process.poll() is None, max_packet), \
        vocab_hash(tiny_models.target), running

    async def stop() -> None:
        held["reader"].cancel()
        await asyncio.gather(held["reader"], return_exceptions=True)
        await held["client"].__aexit__(None, None, None)

    harness.run(stop())
    harness.close()
    running.process.terminate()
    assert running.process.wait(timeout=15) == 0


@pytest.mark.integration
@fuzz_settings(bounded=100)
@given(st.data())
def test_a_verifier_process_behind_mosquitto_answers_every_fuzzed_message(mosquitto_fuzzer, data):
    harness, fuzzer, vocab, _ = mosquitto_fuzzer
    device = f"fz-{uuid.uuid4().hex[:10]}"
    harness.run(fuzzer.send(device, data.draw(payloads(device, vocab, inbound=True)), "mosquitto"))
