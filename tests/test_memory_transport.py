"""The transport seam: the in-process broker keeps the MQTT behaviour SLED relies on, the shared reconnect loop
rides out lost connections, and a real verifier and real edge devices run over it end to end, token for token
the target's own greedy output, through a broker restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest

from conftest import PROMPTS
from sled_protocol.connection import Reconnecting
from sled_protocol.memory import forget_broker, memory_broker
from sled_protocol.transport import Message, TransportError, Will, parse_broker_url, transport_for


@pytest.fixture
def broker_name():
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    forget_broker(name)


def memory_transport(name: str):
    return transport_for(parse_broker_url(f"memory://{name}"))


async def next_message(link) -> Message:
    async with asyncio.timeout(5):
        return await anext(aiter(link.messages()))


# -- the in-memory broker ----------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_filters_retained_messages_and_wills_behave_as_on_a_broker(broker_name):
    transport = memory_transport(broker_name)
    will = Will("sled/v1/verifiers/v", b"offline", qos=1, retain=True)
    async with transport.connect("watcher") as watcher, transport.connect("verifier", will) as verifier:
        await verifier.publish("sled/v1/verifiers/v", b"online", retain=True)
        await watcher.subscribe("sled/v1/verifiers/+")  # subscribed after the publish: gets the retained one
        assert await next_message(watcher) == Message("sled/v1/verifiers/v", b"online", retain=True)
        await verifier.publish("sled/v1/verdicts/d", b"not for the watcher")
        await verifier.publish("sled/v1/verifiers/v/extra", b"one level too deep")
        memory_broker(broker_name).drop("verifier")  # lost, not closed: the broker publishes its will
        assert await next_message(watcher) == Message("sled/v1/verifiers/v", b"offline")
        with pytest.raises(TransportError):
            await verifier.publish("sled/v1/verifiers/v", b"online")
    assert memory_broker(broker_name).retained == {"sled/v1/verifiers/v": b"offline"}


@pytest.mark.asyncio
async def test_a_clean_disconnect_sends_no_will_and_a_second_client_id_takes_over(broker_name):
    transport = memory_transport(broker_name)
    async with transport.connect("watcher") as watcher:
        await watcher.subscribe("sled/#")
        async with transport.connect("v", Will("sled/will", b"gone")):
            pass
        async with transport.connect("dup") as first:
            async with transport.connect("dup") as second:  # same client id: the first connection is dropped
                with pytest.raises(TransportError):
                    await first.publish("sled/x", b"from the old connection")
                await second.publish("sled/x", b"from the new one")
        assert await next_message(watcher) == Message("sled/x", b"from the new one")  # no will came first


# -- the shared reconnect loop -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_the_reconnect_loop_resubscribes_after_a_lost_connection(broker_name):
    transport = memory_transport(broker_name)
    received: asyncio.Queue[Message] = asyncio.Queue()
    links: asyncio.Queue = asyncio.Queue()  # each live connection, as the loop hands it to the service
    loop = Reconnecting([transport], "svc", subscriptions=[("sled/in/+", 0)])

    async def serve(link) -> None:
        links.put_nowait(link)
        async for message in link.messages():
            received.put_nowait(message)

    task = asyncio.create_task(loop.run(serve))
    try:
        async with transport.connect("sender") as sender:
            first = await links.get()
            await sender.publish("sled/in/a", b"1")
            assert (await received.get()).payload == b"1"
            memory_broker(broker_name).drop("svc")
            second = await links.get()  # back, after the backoff, with its subscription in place again
            assert second is not first and loop.connected.is_set() and isinstance(loop.last_error, TransportError)
            await sender.publish("sled/in/b", b"2")
            assert (await received.get()).payload == b"2" and loop.reconnects == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_an_error_the_loop_does_not_own_propagates(broker_name):
    loop = Reconnecting([memory_transport(broker_name)], "svc")

    async def serve(link) -> None:
        raise KeyError("a bug in the service")

    with pytest.raises(KeyError):
        await loop.run(serve)


# -- a verifier and edge devices over the in-memory transport ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.asyncio
async def test_verifier_and_edges_in_process_are_exact_through_a_broker_restart(tiny_models, reference, broker_name):
    """The same services as in production (``sled_verifier.__main__.serve``, ``EdgeDevice``), only the URL differs;
    every connection is dropped at the first committed tokens, and both sides reconnect through the shared loop."""
    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig
    from sled_verifier.__main__ import serve
    from sled_verifier.config import VerifierConfig

    url = f"memory://{broker_name}"
    config = VerifierConfig(target=str(tiny_models.target), mqtt_url=url, verifier_id="mem-v", threads=1,
                            metrics_port=0)
    ready = asyncio.Event()
    verifier = asyncio.create_task(serve(config, ready), name="verifier")
    try:
        await ready.wait()
        same = EdgeDevice(EdgeConfig(draft=str(tiny_models.target_onnx), mqtt_url=url, device_id="mem-a",
                                     timeout_s=2.0))
        other = EdgeDevice(EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=url, device_id="mem-b",
                                      draft_tokens=3, timeout_s=2.0))
        dropped = []

        def drop_once(tokens: list[int]) -> None:
            if not dropped:
                dropped.append(len(tokens))
                memory_broker(broker_name).drop_all()

        async with same, other:
            prompts = [same.encode_prompt(PROMPTS[0]), other.encode_prompt(PROMPTS[3])]
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(same.generate(prompts[0], 32, on_tokens=drop_once)),
                        group.create_task(other.generate(prompts[1], 24))]
            results = [run.result() for run in runs]
            assert dropped and same.connection.reconnects >= 1 and other.connection.reconnects >= 1
        assert results[0].token_ids == reference(prompts[0], 32)
        assert results[1].token_ids == reference(prompts[1], 24)
        assert results[0].acceptance_rate == 1.0 and results[1].acceptance_rate < 0.5
        assert not verifier.done()  # it rode out the restart too
    finally:
        verifier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await verifier


# -- publishing a step's verdicts at once, on both transports --------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["memory", "mqtt"])
async def test_publish_many_delivers_in_order_and_a_closed_link_raises(kind, broker_name, broker):
    """``Link.publish_many`` (a verification step's verdicts; over MQTT at QoS 0 straight through paho, no wait
    each) delivers every message, in order, to the subscriber; on a link already closed it raises TransportError
    rather than dropping the lot unseen."""
    transport = memory_transport(broker_name) if kind == "memory" else transport_for(parse_broker_url(broker.url))
    topic = f"sled/v1/verdicts/many-{uuid.uuid4().hex[:6]}"
    sent = [(topic, f"verdict {i}".encode()) for i in range(200)]
    async with transport.connect(f"sub-{uuid.uuid4().hex[:6]}") as subscriber:
        await subscriber.subscribe(topic, qos=0)
        async with transport.connect(f"pub-{uuid.uuid4().hex[:6]}") as publisher:
            await publisher.publish_many(sent, qos=0)
            received, idle_from = [], time.thread_time()
            await asyncio.sleep(0.3)  # the loop must be idle now: no socket left watched with nothing to write
            assert time.thread_time() - idle_from < 0.15
            async with asyncio.timeout(10):
                async for message in subscriber.messages():
                    received.append((message.topic, message.payload))
                    if len(received) == len(sent):
                        break
        assert received == sent
    with pytest.raises(TransportError):
        await publisher.publish_many(sent[:1], qos=0)
