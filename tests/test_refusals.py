"""Refusals reach the session they belong to (issue 19, item 6), and verdicts say which target computed them.

A refused draft's verdict names its session and seq whenever they can be read, even when the draft is never decoded
(over the size limit, over a rate limit), so the edge's own path runs at once: "retry later" (rate_limited,
overloaded) backs off and resends, too_large fails the request with the verifier's reason. Before, such verdicts
carried no session: the edge waited out its timeout, counted the verifier as silent and moved off a healthy one.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conftest import PROMPTS
from sled_edge.client import EdgeDevice, EdgeError
from sled_edge.config import EdgeConfig
from sled_protocol import Draft, Verdict, VerdictKind, decode_verdict, topics
from sled_protocol.transport import parse_broker_url, transport_for
from test_edge_resilience import MAX_NEW, generate_against, verified
from test_hostile_messages import memory_verifier

pytestmark = pytest.mark.slow


def edge(url: str, tiny_models, **overrides) -> EdgeDevice:
    # A timeout far longer than the test: any refusal that failed to reach its session would show as a retry.
    return EdgeDevice(EdgeConfig(draft=str(tiny_models.target_onnx), mqtt_url=url, device_id="honest", timeout_s=60.0,
                                 **overrides))


@contextlib.asynccontextmanager
async def refusals_seen(name: str, device_id: str = "honest"):
    """Every error verdict sent to ``device_id`` on broker ``name`` while inside, as (error, session, seq)."""
    seen: list[tuple[str, str | None, int | None]] = []

    async def watch(link) -> None:
        async for message in link.messages():
            verdict = decode_verdict(message.payload)
            if verdict.kind is VerdictKind.ERROR:
                seen.append((str(verdict.error), verdict.session_id, verdict.seq))

    async with transport_for(parse_broker_url(f"memory://{name}")).connect("watcher") as link:
        await link.subscribe(topics.verdict_topic(device_id))
        task = asyncio.create_task(watch(link))
        try:
            yield seen
        finally:
            task.cancel()


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", [{"max_drafts_per_s": 2.0},  # burst 4, then 2/s
                                   {"max_bytes_per_s": 150.0, "max_message_bytes": 400}])  # burst 400 B, 150 B/s
async def test_a_rate_limited_session_backs_off_and_finishes_exact(tiny_models, reference, limit):
    async with memory_verifier(tiny_models, **limit) as (name, verifier), refusals_seen(name) as refusals:
        async with edge(f"memory://{name}", tiny_models, draft_tokens=2) as device:
            prompt = device.encode_prompt(PROMPTS[1])
            result = await device.generate(prompt, 24)  # 8 rounds: past the burst
        assert result.token_ids == reference(prompt, 24)
        assert refusals and all(error == "rate_limited" and session == result.session_id and seq is not None
                                for error, session, seq in refusals), refusals
        assert result.retries == 0 and result.failovers == 0  # every refusal answered its round at once
        assert not verifier.done()


@pytest.mark.asyncio
async def test_a_draft_over_the_size_limit_fails_its_request_with_the_reason(tiny_models):
    async with memory_verifier(tiny_models, max_message_bytes=300) as (name, verifier):
        async with edge(f"memory://{name}", tiny_models) as device:
            prompt = device.encode_prompt(" ".join(PROMPTS) * 6)
            with pytest.raises(EdgeError) as raised:
                async with asyncio.timeout(30):  # the refusal, not the 60 s verdict timeout
                    await device.generate(prompt, 4)
        assert raised.value.code == "too_large" and "exceeds the configured max_message_bytes 300" in str(raised.value)
        assert not verifier.done()


# -- the target identity on verdicts, against a scripted verifier announcing target "t-1" ---------------------------

def verified_by(target: str | None):
    def answer(n: int, draft: Draft, verifier_id: str) -> Verdict:
        return Verdict(**{**verified(draft, verifier_id).__dict__, "target": target})
    return answer


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.parametrize("target", ["t-1", None])
async def test_verdicts_of_the_pinned_target_or_naming_none_are_applied(own_broker, tiny_models, target):
    result, _, _ = await generate_against(own_broker, tiny_models.gpt2_onnx, verified_by(target))
    assert len(result.token_ids) == MAX_NEW


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_verdict_computed_by_another_target_is_never_applied(own_broker, tiny_models):
    """The verifier's id now serves another model (its new Status not yet seen): its tokens are not the session's."""
    with pytest.raises(EdgeError) as raised:
        await generate_against(own_broker, tiny_models.gpt2_onnx, verified_by("t-2"), discovery_timeout_s=0.5)
    assert raised.value.code == "target_unavailable" and "answered with target t-2" in str(raised.value)
