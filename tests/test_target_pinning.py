"""A session never changes its model: two verifiers serving different targets that share one tokenizer, the
holding one frozen (SIGSTOP) until the device has noticed its silence, then killed mid-generation. The session moves only to a verifier of the same
target (exact output), and with none it fails naming both identities; it never finishes on the other target."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PROMPTS, Broker, RoundCounter, greedy_reference, scrape, start_verifier
from sled_edge.client import EdgeDevice, EdgeError
from sled_edge.config import EdgeConfig
from sled_protocol.devbroker import free_port
from sled_verifier.identity import target_identity

pytestmark = pytest.mark.integration

MAX_NEW = 60


@pytest.fixture(scope="module")
def targets(tiny_models, tmp_path_factory):
    """The tiny target, a copy of it under another name (the same target), and a target with other random
    weights built on the same tokenizer (same vocabulary hash, different model)."""
    import warnings

    from sled_models.tiny import TARGET_LLAMA, TinySpec, build_model

    root = tmp_path_factory.mktemp("targets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = build_model(TinySpec(**{**TARGET_LLAMA.__dict__, "seed": 7}), tiny_models.target, root / "other")
    replica = shutil.copytree(tiny_models.target, root / "replica")
    return tiny_models.target, replica, other


@pytest.fixture(scope="module")
def other_target_verifier(module_broker, targets, tmp_path_factory):
    """Serves the other target in both tests; its id sorts before every same-target candidate, so a
    move that ignored the target would choose it. Its metrics say whether it ever verified a draft."""
    running = start_verifier(module_broker, targets[2], tmp_path_factory.mktemp("other-logs"), f"b-{uuid.uuid4().hex[:6]}",
                             metrics_port=free_port())
    yield running
    running.process.kill()
    running.process.wait(timeout=10)


def start_together(broker, log_dir, *pairs):
    """Start several verifiers at once (each loads torch for seconds)."""
    with ThreadPoolExecutor(len(pairs)) as pool:
        return list(pool.map(lambda pair: start_verifier(broker, pair[1], log_dir, pair[0]), pairs))


async def announced(device: EdgeDevice, *verifier_ids: str) -> None:
    """Wait until every verifier's status has reached the device, so the opening choice is deterministic."""
    async with asyncio.timeout(10):
        while not all(getattr(device.directory.statuses.get(v), "online", False) for v in verifier_ids):
            device.connection.status_changed.clear()
            await device.connection.status_changed.wait()


async def freeze_then_kill(pid: int, counter: RoundCounter, log_events) -> None:
    await counter.reached.wait()
    timeouts = log_events.counts["verdict_timeout"]
    os.kill(pid, signal.SIGSTOP)   # silent: the broker still thinks it is online
    async with asyncio.timeout(30):
        await log_events.wait("verdict_timeout", timeouts + 1)  # the device noticed the silence
    os.kill(pid, signal.SIGKILL)   # gone: the broker publishes its last will


def verified_drafts(verifier) -> float:
    return scrape(verifier.metrics_url)["sled_verifier_drafts_total"]


def pinned_config(tiny_models, broker: Broker, tag: str) -> EdgeConfig:
    return EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=broker.url, device_id=f"pin-{tag}", timeout_s=1.0,
                      retries=3, discovery_timeout_s=1.0)


@pytest.mark.asyncio
async def test_with_only_another_target_left_the_session_fails_naming_both(
        module_broker, targets, other_target_verifier, tiny_models, reference, log_events, tmp_path):
    target, _, other = targets
    tag = uuid.uuid4().hex[:6]
    [holder] = start_together(module_broker, tmp_path, (f"a-{tag}", target))
    counter, committed = RoundCounter(8), []
    try:
        async with EdgeDevice(pinned_config(tiny_models, module_broker, tag), observer=counter) as device:
            await announced(device, holder.verifier_id, other_target_verifier.verifier_id)
            ours, theirs = device.directory.statuses[holder.verifier_id], device.directory.statuses[other_target_verifier.verifier_id]
            assert ours.vocab == theirs.vocab  # one tokenizer: vocabulary equality alone would allow the move
            assert ours.target == target_identity(target, "float32", tmp_path / "cache")
            assert theirs.target == target_identity(other, "float32", tmp_path / "cache") != ours.target
            prompt = device.encode_prompt(PROMPTS[1])
            disruption = asyncio.create_task(freeze_then_kill(holder.process.pid, counter, log_events))
            try:
                with pytest.raises(EdgeError) as raised:
                    await device.generate(prompt, MAX_NEW, on_tokens=committed.extend)
            finally:
                disruption.cancel()
    finally:
        holder.process.kill()
        holder.process.wait(timeout=10)
    assert raised.value.code == "target_unavailable"
    assert ours.target in str(raised.value) and theirs.target in str(raised.value)
    # Everything committed before the failure was the first target's, none of it the other's.
    assert counter.rounds >= 8 and committed == reference(prompt, MAX_NEW)[: len(committed)]
    assert greedy_reference(other)(prompt, MAX_NEW) != reference(prompt, MAX_NEW)  # a mix would be detectable
    assert verified_drafts(other_target_verifier) == 0


@pytest.mark.asyncio
async def test_a_replica_of_the_same_target_takes_the_session_over_exactly(
        module_broker, targets, other_target_verifier, tiny_models, reference, log_events, tmp_path):
    target, replica, _ = targets
    tag = uuid.uuid4().hex[:6]
    holder, same = start_together(module_broker, tmp_path, (f"a-{tag}", target), (f"c-{tag}", replica))
    counter = RoundCounter(8)
    try:
        async with EdgeDevice(pinned_config(tiny_models, module_broker, tag), observer=counter) as device:
            await announced(device, holder.verifier_id, same.verifier_id, other_target_verifier.verifier_id)
            ours, replica_status = device.directory.statuses[holder.verifier_id], device.directory.statuses[same.verifier_id]
            assert replica_status.target == ours.target and replica_status.model != ours.model  # renamed copy
            prompts = [device.encode_prompt(p) for p in PROMPTS[:2]]
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(device.generate(p, MAX_NEW)) for p in prompts]
                group.create_task(freeze_then_kill(holder.process.pid, counter, log_events))
    finally:
        for running in (holder, same):
            running.process.kill()
            running.process.wait(timeout=10)
    for prompt, run in zip(prompts, runs):
        result = run.result()
        assert result.token_ids == reference(prompt, MAX_NEW)
        assert (result.verifier, result.target) == (same.verifier_id, ours.target) and result.failovers >= 1
    assert verified_drafts(other_target_verifier) == 0
