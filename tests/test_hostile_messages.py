"""A hostile device (its account, its password, its topic) sends any bytes with any retain flag: no service dies.

The poison of issue 19 is a sampled draft whose proposal probabilities are finite but huge: ``math.fsum`` overflowed
and the verifier exited 70, and published retained it was replayed to every verifier at every start. Here it is
refused (probabilities outside [0, 1] never reach arithmetic), a retained draft is never processed, and any
exception while admitting one message is that message's refusal. After each attack an honest session still
decodes exactly the target's own greedy output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid

import msgpack
import pytest

from conftest import PROMPTS
from sled_protocol import (ErrorCode, ProtocolError, SamplingParams, VerdictKind, decode, decode_draft, decode_verdict,
                           topics)
from sled_protocol.codec import PEEK_BYTES
from sled_protocol.inspect import describe
from sled_protocol.memory import forget_broker, memory_broker
from sled_protocol.codec import peek_ids
from sled_protocol.transport import parse_broker_url, transport_for


def poison(device: str = "dev-a", session: str = "s-poison", seq: int = 1, vocab: str = "0" * 16,
           q_probs=((1.7e308, 1.7e308),)) -> bytes:
    """The reported message: a sampled draft whose proposal probabilities overflow a sum (~150 bytes)."""
    return msgpack.packb({"t": "draft", "v": 1, "device": device, "session": session, "seq": seq, "base_len": 1,
                          "tokens": [5], "max_len": 10, "vocab": vocab, "context": [1], "sampling": {"temperature": 1.0},
                          "q_ids": [[5, 6]], "q_probs": [list(row) for row in q_probs]})


# -- the decoder ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [(1.7e308, 1.7e308), (float("inf"), 0.0), (float("nan"), 1.0), (-0.5, 1.5),
                                 (1.0000001, 0.0), (2, -1), (True, 0.0), ("0.5", 0.5), (None, 1.0)])
def test_a_proposal_probability_outside_0_1_is_refused_before_any_arithmetic(row):
    with pytest.raises(ProtocolError) as raised:
        decode_draft(poison(q_probs=(row,)))
    assert raised.value.code is ErrorCode.BAD_PROPOSAL
    assert (raised.value.session_id, raised.value.seq) == ("s-poison", 1)


@pytest.mark.parametrize("row", [(1.0, 0.0), (-0.0, 1.0), (5e-324, 1.0), (0.5, 0.5)])
def test_proposal_rows_at_the_edges_of_0_1_are_accepted(row):
    assert decode_draft(poison(q_probs=(row,))).q_probs == (tuple(float(q) for q in row),)


def test_a_top_p_that_is_0_in_float32_is_refused():
    """Found by the fuzzer: 1e-160 passed the (0, 1] check, then travelled (and was used) as float32 0.0."""
    with pytest.raises(ProtocolError) as raised:
        SamplingParams(0.8, top_p=1e-160)
    assert raised.value.code is ErrorCode.BAD_SAMPLING
    assert SamplingParams(0.8, top_p=1.5e-45).top_p > 0  # float32's least subnormal still travels


@pytest.mark.parametrize("body", [{"t": ["draft"], "v": 1}, {"t": {"a": 1}, "v": 1}, {"t": "draft", "v": True},
                                  {"t": "status", "v": 1.0, "verifier": "v", "online": True}])
def test_unhashable_tags_and_versions_that_only_equal_1_are_malformed(body):
    with pytest.raises(ProtocolError) as raised:
        decode(msgpack.packb(body))
    assert raised.value.code is ErrorCode.MALFORMED


def test_peek_reads_session_and_seq_from_the_first_bytes_of_anything():
    big = msgpack.packb({"t": "draft", "v": 1, "device": "d", "session": "s9", "seq": 41, "pad": "x" * 100_000})
    assert peek_ids(big) == ("draft", "s9", 41)
    assert peek_ids(big[:PEEK_BYTES // 2]) == ("draft", "s9", 41)  # seq is in, the rest is not
    for junk in (b"", b"\xc1", b"\x91" * 5000, msgpack.packb([1, 2]), msgpack.packb({"session": ["x"], "seq": -1}),
                 msgpack.packb({"seq": True, "session": "x" * 200}), msgpack.packb({1: 2}, strict_types=False)):
        assert peek_ids(junk) == (None, None, None)


def test_sled_inspect_describes_the_poison_instead_of_dying():
    record = describe("sled/v1/drafts/v/dev-a", poison(), 0.0, retain=True)
    assert record["type"] == "undecodable" and record["error"] == "bad_proposal" and record["retained"] is True
    assert describe("sled/v1/x", msgpack.packb({"t": [1], "v": 1}), 0.0)["type"] == "undecodable"


# -- a real verifier over the in-process broker --------------------------------------------------------------------

@contextlib.asynccontextmanager
async def memory_verifier(tiny_models, name: str | None = None, **overrides):
    """The production service (``sled_verifier.__main__.serve``) on a ``memory://`` broker (a fresh one by default)."""
    from sled_verifier.__main__ import serve
    from sled_verifier.config import VerifierConfig

    name = name or f"hostile-{uuid.uuid4().hex[:8]}"
    config = VerifierConfig(target=str(tiny_models.target), mqtt_url=f"memory://{name}", verifier_id="mem-v",
                            threads=1, metrics_port=0, **overrides)
    ready = asyncio.Event()
    task = asyncio.create_task(serve(config, ready), name="verifier")
    try:
        async with asyncio.timeout(60):
            await ready.wait()
        yield name, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        forget_broker(name)


async def verdicts_within(link, seconds: float) -> list:
    got = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in link.messages():
                got.append(decode_verdict(message.payload))
    return got


async def honest_generation_is_exact(url: str, tiny_models, reference, device_id: str = "honest") -> None:
    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig

    async with EdgeDevice(EdgeConfig(draft=str(tiny_models.target_onnx), mqtt_url=url, device_id=device_id,
                                     timeout_s=2.0)) as device:
        prompt = device.encode_prompt(PROMPTS[1])
        result = await device.generate(prompt, 24)
    assert result.token_ids == reference(prompt, 24)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_poison_is_refused_to_its_session_and_retained_poison_is_never_processed(tiny_models, reference):
    async with memory_verifier(tiny_models) as (name, verifier):
        transport = transport_for(parse_broker_url(f"memory://{name}"))
        async with transport.connect("attacker") as link:
            await link.subscribe(topics.verdict_topic("dev-a"))
            await link.publish(topics.draft_topic("mem-v", "dev-a"), poison(), retain=True)  # live: refused
            [verdict] = await verdicts_within(link, 1.0)
            assert verdict.kind is VerdictKind.ERROR and verdict.error is ErrorCode.BAD_PROPOSAL
            assert (verdict.session_id, verdict.seq) == ("s-poison", 1)
        assert memory_broker(name).retained[topics.draft_topic("mem-v", "dev-a")] == poison()
        assert not verifier.done()
    # A verifier starting where the poison is retained gets it with the retain flag set: it is ignored.
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    transport = transport_for(parse_broker_url(f"memory://{name}"))
    async with transport.connect("attacker") as link:
        await link.subscribe(topics.verdict_topic("dev-a"))
        await link.publish(topics.draft_topic("mem-v", "dev-a"), poison(), retain=True)
        async with memory_verifier(tiny_models, name) as (_, verifier):
            await honest_generation_is_exact(f"memory://{name}", tiny_models, reference)
            memory_broker(name).drop("sled-verifier-mem-v")  # it reconnects, resubscribes, and gets it again
            await honest_generation_is_exact(f"memory://{name}", tiny_models, reference, "honest-2")
            assert not verifier.done()
            assert await verdicts_within(link, 0.2) == []  # delivered twice (retained), never processed or answered


@pytest.mark.slow
@pytest.mark.asyncio
async def test_any_exception_admitting_a_message_is_that_messages_refusal(tiny_models, reference, monkeypatch):
    """Fault injection: the decoder fails as a bug would (the OverflowError of issue 19, raised from inside)."""
    import sled_verifier.service as service

    real = service.decode_inbound

    def failing(payload, limits):
        if b"explode" in payload:
            raise OverflowError("integer division result too large for a float")
        return real(payload, limits)

    monkeypatch.setattr(service, "decode_inbound", failing)
    async with memory_verifier(tiny_models) as (name, verifier):
        transport = transport_for(parse_broker_url(f"memory://{name}"))
        async with transport.connect("attacker") as link:
            await link.subscribe(topics.verdict_topic("dev-a"))
            await link.publish(topics.draft_topic("mem-v", "dev-a"), poison(session="explode", seq=7))
            [verdict] = await verdicts_within(link, 1.0)
        assert verdict.error is ErrorCode.MALFORMED and "OverflowError" in verdict.reason
        assert (verdict.session_id, verdict.seq) == ("explode", 7)
        await honest_generation_is_exact(f"memory://{name}", tiny_models, reference)
        assert not verifier.done()


# -- the real verifier and the real Mosquitto, production settings -------------------------------------------------

@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    from test_security import ProdBroker

    broker = ProdBroker(tmp_path_factory.mktemp("hostile-broker"))
    yield broker
    broker.process.terminate()
    broker.process.wait(timeout=10)


def start_prod_verifier(prod, tiny_models, log_dir):
    from conftest import start_verifier

    return start_verifier(type("B", (), {"url": prod.urls["vsec"]})(), tiny_models.target, log_dir, "vsec",
                          "--ca-file", str(prod.dir / "ca.crt"))


def stop(running) -> int:
    """SIGTERM, as systemd stops it; its exit status. Killed (and the test failed) if it does not stop in 60 s."""
    running.process.terminate()
    try:
        return running.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        running.process.kill()
        running.process.wait(timeout=10)
        raise


async def honest_over_tls_is_exact(prod, tiny_models, reference, prompt_index: int = 0) -> None:
    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig

    config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=prod.urls["dev-b"], device_id="dev-b",
                        ca_file=str(prod.dir / "ca.crt"), draft_tokens=3)
    async with EdgeDevice(config) as device:
        prompt = device.encode_prompt(PROMPTS[prompt_index])
        result = await device.generate(prompt, 16)
    assert result.token_ids == reference(prompt, 16) and result.verifier == "vsec"


async def verdicts_of(client, seconds: float) -> list:
    got = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                got.append(decode_verdict(bytes(message.payload)))
    return got


@pytest.mark.integration
@pytest.mark.asyncio
async def test_the_retained_poison_through_mosquitto_pub_stops_no_verifier(prod, tiny_models, reference, tmp_path):
    """Issue 19's reproduction, verbatim: ``mosquitto_pub -r`` of the poison on the device's own drafts topic, then a
    verifier restart (as systemd's would be). Before the fix the verifier exited 70 at once and at every start."""
    (tmp_path / "poison").write_bytes(poison(device="dev-a"))
    topic = topics.draft_topic("vsec", "dev-a")
    running = start_prod_verifier(prod, tiny_models, tmp_path)
    try:
        async with prod.client("ops") as inspector:  # dev-a's own connection would be taken over by the CLI's
            await inspector.subscribe(topics.verdict_topic("dev-a"))
            sent = prod.cli("mosquitto_pub", "dev-a", "-r", "-q", "1", "-t", topic, "-f", str(tmp_path / "poison"))
            assert sent.returncode == 0, sent.stderr
            verdicts = await verdicts_of(inspector, 2.0)
        assert [(v.error, v.session_id, v.seq) for v in verdicts] == [(ErrorCode.BAD_PROPOSAL, "s-poison", 1)]
        assert stop(running) == 0  # a signal's exit, not 70
        running = start_prod_verifier(prod, tiny_models, tmp_path)  # a fresh log; the poison is retained
        await honest_over_tls_is_exact(prod, tiny_models, reference)
        assert running.process.poll() is None
        assert "retained_draft_ignored" in running.log_path.read_text()
    finally:
        prod.cli("mosquitto_pub", "dev-a", "-r", "-q", "1", "-t", topic, "-n")  # clear it for the other tests
        stop(running)


@pytest.mark.integration
def test_sled_inspect_shows_the_retained_poison_and_goes_on(broker, tmp_path):
    from conftest import ROOT

    topic = topics.draft_topic("v-inspected", f"dev-{uuid.uuid4().hex[:6]}")
    (tmp_path / "poison").write_bytes(poison())
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-r", "-t", topic, "-f", str(tmp_path / "poison")],
                   check=True, timeout=20)
    try:
        shown = subprocess.run([sys.executable, "-m", "sled_protocol.inspect", "--mqtt-url", broker.url, "--filter",
                                topic, "--count", "1", "--json"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    finally:
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-r", "-t", topic, "-n"], check=True, timeout=20)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["type"] == "undecodable" and record["error"] == "bad_proposal" and record["retained"] is True


@pytest.mark.integration
@pytest.mark.asyncio
async def test_oversized_nested_and_a_refusal_storm_stop_no_one(prod, tiny_models, reference, tmp_path):
    """One device's account sends what costs most: a message near the broker's packet limit, nested ones (60,000
    deep, and 20,000 deep within the size limit), then a storm of 3000 bad messages while another device decodes. The big ones are refused by their size
    before any decoding, naming the session read from their first bytes; the storm is answered and logged within
    the device's refusal budget and only counted beyond it; the honest device's output is exact throughout."""
    running = start_prod_verifier(prod, tiny_models, tmp_path)
    topic = topics.draft_topic("vsec", "dev-a")
    head = {"t": "draft", "v": 1, "device": "dev-a", "session": "s-big", "seq": 4}
    oversized = msgpack.packb({**head, "pad": [[]] * 60_000})  # under the broker's 64 KiB packets, over our limit
    nested = [b"\x86" + msgpack.packb({**head, "seq": seq})[1:] + b"\xa3pad" + b"\x91" * depth + b"\xc0"
              for seq, depth in ((5, 60_000), (6, 20_000))]  # over the size limit; under it, past msgpack's depth
    storm = [bytes([i % 256]) * (i % 40) + poison(session=f"st-{i}", seq=i)[: i % 150] for i in range(3000)]
    started_s = asyncio.get_running_loop().time()
    try:
        async with prod.client("ops") as inspector, prod.client("dev-a") as attacker:
            await inspector.subscribe(topics.verdict_topic("dev-a"))
            await attacker.publish(topic, oversized)
            for payload in nested:
                await attacker.publish(topic, payload)
            verdicts = await verdicts_of(inspector, 2.0)

            async def flood() -> None:
                for index, payload in enumerate(storm):
                    await attacker.publish(topic, payload)
                    if index % 200 == 0:
                        await asyncio.sleep(0)

            async with asyncio.TaskGroup() as group:
                group.create_task(flood())
                group.create_task(honest_over_tls_is_exact(prod, tiny_models, reference, prompt_index=1))
            await honest_over_tls_is_exact(prod, tiny_models, reference, prompt_index=3)  # and after it
        elapsed_s = asyncio.get_running_loop().time() - started_s
        assert [(v.error, v.session_id, v.seq) for v in verdicts] == [
            (ErrorCode.TOO_LARGE, "s-big", 4), (ErrorCode.TOO_LARGE, "s-big", 5), (ErrorCode.MALFORMED, "s-big", 6)]
        assert "exceeds" in verdicts[0].reason and "context limit" in verdicts[0].reason
        assert running.process.poll() is None
        logged = [line for line in running.log_path.read_text().splitlines()
                  if "draft_refused" in line and '"dev-a"' in line]
        assert 20 <= len(logged) <= 20 + 5 * elapsed_s  # the default budget: burst 20, then 5/s; the rest counted
    finally:
        stop(running)
