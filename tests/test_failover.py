"""Failures that must not cost anyone their output: a verifier killed mid-generation, a broker restart
mid-generation, and thousands of random and mutated messages thrown at a verifier serving real sessions."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid

import msgpack
import pytest

from conftest import PROMPTS, RoundCounter, edge_config, start_verifier
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol import Draft, SamplingParams, encode
from sled_protocol import topics
from sled_protocol.devbroker import start_dev_broker
from sled_protocol.mqtt import make_client
from sled_protocol.transport import parse_broker_url
from sled_verifier.config import VerifierConfig
from sled_verifier.service import REFUSAL_BURST_S

REFUSALS_PER_S = VerifierConfig.max_refusals_per_s
REFUSAL_BURST = REFUSAL_BURST_S * REFUSALS_PER_S

pytestmark = pytest.mark.integration


async def three_sessions(device: EdgeDevice, max_new: int, disrupt) -> list:
    prompts = [device.encode_prompt(p) for p in PROMPTS[:3]]
    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(device.generate(p, max_new)) for p in prompts]
        group.create_task(disrupt())
    return [(prompt, run.result()) for prompt, run in zip(prompts, runs)]


@pytest.mark.asyncio
async def test_killing_the_verifier_mid_generation_loses_nothing(own_broker, tiny_models, reference, tmp_path):
    tag = uuid.uuid4().hex[:6]
    first = start_verifier(own_broker, tiny_models.target, tmp_path, f"fo-a-{tag}")
    second = start_verifier(own_broker, tiny_models.target, tmp_path, f"fo-b-{tag}")
    counter = RoundCounter(after=8)
    config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=own_broker.url, device_id=f"fo-dev-{tag}",
                        timeout_s=1.0)

    async def kill_first() -> None:
        await counter.reached.wait()
        os.kill(first.process.pid, signal.SIGKILL)  # no goodbye: the broker publishes its last will

    try:
        async with EdgeDevice(config, observer=counter) as device:
            results = await three_sessions(device, 60, kill_first)
        for prompt, result in results:
            assert result.token_ids == reference(prompt, 60)
            assert result.verifier == second.verifier_id and result.failovers >= 1
    finally:
        for running in (first, second):
            running.process.kill()
            running.process.wait(timeout=10)


@pytest.mark.asyncio
async def test_a_broker_restart_mid_generation_loses_nothing(own_broker, tiny_models, reference, log_events, tmp_path):
    running = start_verifier(own_broker, tiny_models.target, tmp_path, f"br-{uuid.uuid4().hex[:6]}")
    counter = RoundCounter(after=8)
    config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=own_broker.url, device_id="br-dev", timeout_s=1.0,
                        retries=20)

    rounds_before_restart = []

    async def restart_broker() -> None:
        await counter.reached.wait()
        losses = log_events.counts["broker_connection_lost"]
        own_broker.process.terminate()
        await asyncio.to_thread(own_broker.process.wait, 10)
        rounds_before_restart.append(counter.rounds)
        async with asyncio.timeout(30):  # the device has seen the broker go, so it must reconnect
            await log_events.wait("broker_connection_lost", losses + 1)
        own_broker.process, _ = await asyncio.to_thread(start_dev_broker, tmp_path / "broker2", own_broker.port)

    try:
        async with EdgeDevice(config, observer=counter) as device:
            results = await three_sessions(device, 60, restart_broker)
            assert device.connection.reconnects >= 1
        for prompt, result in results:
            assert result.token_ids == reference(prompt, 60)
        assert counter.rounds > rounds_before_restart[0]  # the sessions were mid-generation at the restart
        assert running.process.poll() is None
    finally:
        running.process.terminate()
        running.process.wait(timeout=15)


def fuzz_messages(rng: random.Random, vocab: str, count: int) -> list[tuple[str, bytes]]:
    """(device, payload) pairs: garbage, truncations, wrong types, huge arrays, bad ids and probabilities."""
    base = Draft(device_id="fuzz-0", session_id="s", seq=0, base_len=3, tokens=(1, 2, 3), max_len=40, vocab=vocab,
                 context=(5, 6, 7))
    sampled = Draft(**{**base.__dict__, "sampling": SamplingParams(0.9, seed=1), "q_ids": ((1, 2), (2,), (3, 4)),
                       "q_probs": ((0.5, 0.5), (1.0,), (0.25, 0.75))})
    mutations = [
        lambda b: b.update(tokens=[rng.randint(-10**9, 10**9) for _ in range(rng.randint(0, 40))]),
        lambda b: b.update(seq=rng.choice([-1, "x", 2**64 - 1, -(2**63), None, 1.5, [], {}])),
        lambda b: b.update(base_len=rng.choice([0, -5, 10**9, "3", 3.0])),
        lambda b: b.update(context=[rng.randint(0, 600) for _ in range(rng.randint(0, 8))]),
        lambda b: b.update(tokens=list(range(rng.randint(1000, 20000)))),
        lambda b: b.update(vocab=rng.choice(["", "x" * 500, 7, None])),
        lambda b: b.update(session=rng.choice(["", "s" * 300, 42, None, "s"])),
        lambda b: b.update(q_probs=[[float("nan")], [rng.random()], [-1.0, 2.0]]),
        lambda b: b.update(q_ids=[[10**7], [], [1, 1]]),
        lambda b: b.update(sampling={"temperature": rng.choice([-1, float("inf"), "hot", 1e9])}),
        lambda b: b.update(max_len=rng.choice([1, 2, 10**12])),
        lambda b: b.update(v=rng.choice([0, 2, "1", None])),
        lambda b: b.pop(rng.choice(list(b))),
    ]
    messages = []
    for i in range(count):
        device = f"fuzz-{i % 10}"
        body = msgpack.unpackb(encode(rng.choice([base, sampled])))
        body["device"] = device
        kind = rng.random()
        if kind < 0.15:
            payload = rng.randbytes(rng.randint(0, 300))
        elif kind < 0.3:
            packed = msgpack.packb(body)
            payload = packed[: rng.randint(0, len(packed) - 1)]
        elif kind < 0.35:
            payload = msgpack.packb(rng.choice([[], 5, "draft", None, [body]]))
        else:
            for mutate in rng.sample(mutations, rng.randint(1, 3)):
                mutate(body)
            payload = msgpack.packb(body)
        messages.append((device, payload))
    return messages


@pytest.mark.asyncio
async def test_fuzzed_drafts_hurt_no_one(each_verifier, tiny_models, reference, device_id):
    rng = random.Random(2026)
    config = edge_config(each_verifier, tiny_models.gpt2_onnx, device_id)
    captured: list[bytes] = []

    async def fuzz() -> None:
        async with make_client(parse_broker_url(each_verifier.url), f"fuzzer-{uuid.uuid4().hex[:6]}") as client:
            await client.subscribe(f"sled/v1/drafts/{each_verifier.verifier_id}/{device_id}")
            for index, (device, payload) in enumerate(fuzz_messages(rng, vocab, 3000)):
                await client.publish(topics.draft_topic(each_verifier.verifier_id, device), payload)
                if index % 100 == 0:
                    await asyncio.sleep(0.01)
            try:
                async with asyncio.timeout(10):  # the real device's own drafts so far...
                    async for message in client.messages:
                        captured.append(bytes(message.payload))
                        if len(captured) >= 20:
                            break
            except TimeoutError:  # a loaded machine: replay what came (asserted non-empty below)
                pass
            rng.shuffle(captured)  # ...replayed out of order while its sessions go on
            for payload in captured:
                await client.publish(topics.draft_topic(each_verifier.verifier_id, device_id), payload)

    started_s = time.monotonic()
    async with EdgeDevice(config) as device:
        vocab = device.vocab
        results = await three_sessions(device, 48, fuzz)
        assert captured, "no real draft was captured to replay"
        for prompt, result in results:
            assert result.token_ids == reference(prompt, 48)
        again = await device.generate(device.encode_prompt("import"), 8)  # still serving afterwards
    assert again.token_ids == reference(device.encode_prompt("import"), 8)
    assert each_verifier.process.poll() is None and len(captured) >= 10
    log = each_verifier.log_path.read_text()
    # Refused, and each fuzzing device's refusals logged (and answered) only within its refusal budget.
    budget = 10 * (REFUSAL_BURST + REFUSALS_PER_S * (time.monotonic() - started_s))  # 10 fuzzing devices
    logged = [line for line in log.splitlines() if "draft_refused" in line and '"fuzz-' in line]
    assert 10 * REFUSAL_BURST <= len(logged) <= budget and "batch_failed" not in log


def test_verifier_survives_sigterm_cleanly(tiny_models, broker, tmp_path):
    running = start_verifier(broker, tiny_models.target, tmp_path, f"term-{uuid.uuid4().hex[:6]}")
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=15) == 0
