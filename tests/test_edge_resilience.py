"""The edge against a scripted verifier on a real Mosquitto: an `overloaded` refusal is backed off and retried,
a lone silent verifier is retried without waiting out discovery, and an unexpected error in the connection
task restarts it instead of stranding the sessions."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import pytest

import sled_edge.connection as connection_module
from conftest import PROMPTS, Broker
from sled_edge.client import EdgeDevice, EdgeError
from sled_edge.config import EdgeConfig
from sled_protocol import Close, Draft, ErrorCode, FinishReason, Status, Verdict, VerdictKind, encode
from sled_protocol import topics
from sled_protocol.codec import decode_inbound
from sled_protocol.mqtt import make_client
from sled_protocol.transport import parse_broker_url
from sled_protocol.vocab import vocab_hash

pytestmark = pytest.mark.integration

MAX_NEW = 12


def verified(draft: Draft, verifier_id: str) -> Verdict:
    """Accept every draft token and add token 1: a well-formed verdict (the tokens do not matter here)."""
    committed = draft.base_len + len(draft.tokens) + 1
    return Verdict(kind=VerdictKind.VERIFIED, verifier_id=verifier_id, session_id=draft.session_id, seq=draft.seq,
                   accepted=len(draft.tokens), next_token=1, committed_len=committed,
                   finish=FinishReason.LENGTH if committed >= draft.max_len else None)


Answer = Callable[[int, Draft, str], Verdict | None]


async def scripted_verifier(broker: Broker, verifier_id: str, vocab: str, answer: Answer, ready: asyncio.Event) -> None:
    """Announce a verifier, then answer its n-th draft (from 0) with ``answer(n, draft, verifier_id)``
    (None: stay silent)."""
    status = Status(verifier_id, True, model="scripted", vocab=vocab, capacity=4, max_draft_tokens=4, target="t-1")
    async with make_client(parse_broker_url(broker.url), f"scripted-{verifier_id}") as client:
        await client.subscribe(topics.drafts_filter(verifier_id))
        await client.publish(topics.status_topic(verifier_id), encode(status), qos=1, retain=True)
        ready.set()
        received = 0
        try:
            async for message in client.messages:
                draft = decode_inbound(bytes(message.payload))
                if isinstance(draft, Close):
                    continue
                verdict = answer(received, draft, verifier_id)
                received += 1
                if verdict is not None:
                    await client.publish(topics.verdict_topic(draft.device_id), encode(verdict))
        finally:
            offline = Status(verifier_id, False, vocab=vocab, target="t-1")
            await client.publish(topics.status_topic(verifier_id), encode(offline), qos=1, retain=True)


async def generate_against(broker: Broker, draft_dir, answer: Answer, **overrides):
    verifier_id = f"s-{uuid.uuid4().hex[:6]}"
    config = EdgeConfig(draft=str(draft_dir), mqtt_url=broker.url, device_id=f"d-{uuid.uuid4().hex[:6]}",
                        verifier=verifier_id, draft_tokens=2, **overrides)
    ready = asyncio.Event()
    server = asyncio.create_task(scripted_verifier(broker, verifier_id, vocab_hash(draft_dir), answer, ready))
    try:
        await ready.wait()
        async with EdgeDevice(config) as device:
            started = time.monotonic()
            result = await device.generate(device.encode_prompt(PROMPTS[0]), MAX_NEW)
            return result, time.monotonic() - started, device
    finally:
        server.cancel()
        await asyncio.wait([server])


@pytest.mark.asyncio
async def test_an_overloaded_verifier_is_backed_off_and_retried(own_broker, tiny_models):
    refused = []

    def answer(n: int, draft: Draft, verifier_id: str) -> Verdict:
        if n < 3:  # the first three tries of the first round find the queue full
            refused.append(draft.seq)
            return Verdict(kind=VerdictKind.ERROR, verifier_id=verifier_id, session_id=draft.session_id, seq=draft.seq,
                           error=ErrorCode.OVERLOADED, reason="verification queue is full; retry later")
        return verified(draft, verifier_id)

    result, _, _ = await generate_against(own_broker, tiny_models.gpt2_onnx, answer)
    assert refused == [0, 0, 0]
    assert len(result.token_ids) == MAX_NEW and result.finish_reason == "length"


@pytest.mark.asyncio
async def test_a_lone_silent_verifier_is_retried_without_waiting_out_discovery(own_broker, tiny_models):
    def answer(n: int, draft: Draft, verifier_id: str) -> Verdict | None:
        return None if n < 2 else verified(draft, verifier_id)  # two lost rounds: a move is tried

    result, elapsed_s, _ = await generate_against(own_broker, tiny_models.gpt2_onnx, answer,
                                                  timeout_s=0.3, discovery_timeout_s=30.0)
    assert len(result.token_ids) == MAX_NEW and result.retries == 2 and result.failovers == 0
    assert elapsed_s < 10  # not the 30 s of discovery: nobody else could take the session


@pytest.mark.asyncio
async def test_an_unexpected_connection_error_restarts_the_connection(own_broker, tiny_models, monkeypatch):
    real_transport_for = connection_module.transport_for
    injected = []

    class FaultyLink:
        """A link whose message stream fails with a non-transport error at the first verdict, once."""

        def __init__(self, real) -> None:
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        async def messages(self):
            async for message in self.real.messages():
                if not injected and message.topic.startswith(f"{topics.PREFIX}/verdicts/"):
                    injected.append(True)
                    raise RuntimeError("injected fault in the connection task")
                yield message

    class FaultyTransport:
        def __init__(self, *args, **kwargs) -> None:
            self.real = real_transport_for(*args, **kwargs)

        @contextlib.asynccontextmanager
        async def connect(self, identifier, will=None):
            async with self.real.connect(identifier, will) as link:
                yield FaultyLink(link)

    monkeypatch.setattr(connection_module, "transport_for", FaultyTransport)
    def answer(n: int, draft: Draft, verifier_id: str) -> Verdict:
        return verified(draft, verifier_id)

    result, _, device = await generate_against(own_broker, tiny_models.gpt2_onnx, answer, timeout_s=1.0)
    assert injected and device.connection.reconnects == 1
    assert len(result.token_ids) == MAX_NEW and result.finish_reason == "length"


@pytest.mark.asyncio
async def test_a_refusal_ends_the_generation_and_the_session_leaves_the_connection(own_broker, tiny_models):
    """A refusal that is not "retry later" ends the generation with the verifier's reason; the round trip takes
    the session's verdict queue and routing out of the connection (after a success too)."""
    verifier_id = f"s-{uuid.uuid4().hex[:6]}"
    config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=own_broker.url,
                        device_id=f"d-{uuid.uuid4().hex[:6]}", verifier=verifier_id, draft_tokens=2)

    def answer(n: int, draft: Draft, verifier_id: str) -> Verdict:
        if n == 1:  # the second generation's first round
            return Verdict(kind=VerdictKind.ERROR, verifier_id=verifier_id, session_id=draft.session_id, seq=draft.seq,
                           error=ErrorCode.BAD_TOKEN, reason="token 99999 is outside the vocabulary")
        return verified(draft, verifier_id)

    ready = asyncio.Event()
    server = asyncio.create_task(scripted_verifier(own_broker, verifier_id, vocab_hash(tiny_models.gpt2_onnx),
                                                   answer, ready))
    try:
        await ready.wait()
        async with EdgeDevice(config) as device:
            prompt = device.encode_prompt(PROMPTS[0])
            done = await device.generate(prompt, 3)  # one round of 2 accepted + 1: length
            assert done.finish_reason == "length" and device.connection.waiters == {}
            with pytest.raises(EdgeError, match="bad_token: token 99999 is outside the vocabulary"):
                await device.generate(prompt, MAX_NEW)
            assert device.connection.waiters == {} and device.connection.holders == {}
    finally:
        server.cancel()
        await asyncio.wait([server])


@pytest.mark.asyncio
async def test_a_former_verifiers_offline_notice_does_not_move_the_session_again(tiny_models):
    """A session that left verifier A for B may have A's offline notice and late verdict in its queue (A went
    down while the session was drafting or backing off). The move drops them and A's later notices never reach
    the session, so the round on B takes B's verdict; B's own notice still ends the wait at once."""
    from sled_edge.connection import EdgeConnection, VerifierDown
    from sled_edge.directory import VerifierDirectory
    from sled_edge.round_trip import RoundTrip
    from sled_edge.session import EdgeSession

    config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), device_id="d-moved", timeout_s=2.0)
    from sled_protocol.transport import parse_broker_urls

    connection = EdgeConnection(parse_broker_urls(config.mqtt_url), config.device_id)  # never started: no broker
    session = EdgeSession("s-moved", config.device_id, "v", [1, 2, 3], 20)
    a, b = Status("a", True, vocab="v"), Status("b", True, vocab="v")

    def verdict(verifier: str) -> Verdict:
        return Verdict(kind=VerdictKind.VERIFIED, verifier_id=verifier, session_id=session.session_id, seq=0,
                       accepted=0, next_token=7, committed_len=4)

    async with RoundTrip(connection, VerifierDirectory(connection, "v"), config, session, a) as trip:
        for status in (a, b, Status("a", False, vocab="v")):  # a's will: its notice is queued before the move
            connection._dispatch(topics.status_topic(status.verifier_id), encode(status))
        connection._route(verdict("a"))
        assert connection.waiters[session.session_id].qsize() == 2
        trip.holder_status = b  # moved to b
        connection.reassign(session.session_id, "b")
        assert connection.waiters[session.session_id].qsize() == 0  # the move dropped what a left
        connection._dispatch(topics.status_topic("a"), encode(a))
        connection._dispatch(topics.status_topic("a"), encode(Status("a", False, vocab="v")))
        connection._route(verdict("a"))
        assert connection.waiters[session.session_id].qsize() == 0  # a holds no session of ours now
        answer = verdict("b")
        connection._route(answer)
        assert await trip._verdict_for(0) is answer
        connection._dispatch(topics.status_topic("b"), encode(Status("b", False, vocab="v")))
        assert isinstance(await trip._verdict_for(0), VerifierDown)
