"""One device floods the verifier while honest devices decode (issue 19): the real verifier process, the real
Mosquitto, real edge devices. The flooder opens waves of sessions with long contexts from one device and answers
every verdict at once with a next round; the honest devices must come back exact (token for token the target's
greedy output), the verifier must stay up, and fairness is asserted in verifier steps, never in seconds: steps
are kept full (``--max-batch-drafts 4``, the flooder has up to 16 drafts queued, 3 of which fit its part of a
step), so only round robin across devices answers each honest round in the very next step, and a small session
table (``--max-sessions 24``) is where a shared LRU would evict the honest sessions."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.flood import flood
from conftest import PROMPTS, start_verifier
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol.vocab import vocab_hash

pytestmark = pytest.mark.integration

HONEST = ("honest-a", "honest-b", "honest-c")
TOKENS = 40


def events(log_path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]


@pytest.mark.asyncio
async def test_a_flooding_device_neither_starves_nor_evicts_honest_ones(broker, tiny_models, reference, tmp_path):
    verifier = start_verifier(broker, tiny_models.target, tmp_path, "v-flood", "--max-batch-drafts", "4",
                              "--max-sessions", "24", "--device-max-sessions", "16", "--device-max-drafts", "16")
    try:
        stop = asyncio.Event()
        flooder = asyncio.create_task(flood(broker.url, verifier.verifier_id, vocab_hash(tiny_models.target), stop,
                                            device_id="flooder", wave=48, context=400, pause_s=0.3))
        await asyncio.sleep(1.0)  # the flood is under way first

        async def honest(index: int, device_id: str) -> tuple[list[int], list[int]]:
            config = EdgeConfig(draft=str(tiny_models.target_onnx), mqtt_url=broker.url, device_id=device_id,
                                verifier=verifier.verifier_id, draft_tokens=4, timeout_s=10.0)
            async with EdgeDevice(config) as device:
                prompt = device.encode_prompt(PROMPTS[index])
                return prompt, (await device.generate(prompt, TOKENS)).token_ids

        try:
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(honest(i, d)) for i, d in enumerate(HONEST)]
        finally:
            stop.set()
        tally = await flooder
        for run in runs:
            prompt, tokens = run.result()
            assert tokens == reference(prompt, TOKENS)  # exact under the flood
        assert verifier.process.poll() is None      # no service exits
    finally:
        verifier.process.terminate()
        verifier.process.wait(timeout=15)
    logged = events(verifier.log_path)
    answered = [e for e in logged if e.get("event") == "draft_answered"]
    honest_rounds = [e for e in answered if e["device_id"] in HONEST]
    flood_rounds = [e for e in answered if e["device_id"] == "flooder"]
    # The flood was a flood: many sessions opened, its quotas refused most, and steps were full.
    assert tally.opened >= 96 and tally.verdicts["overloaded"] > 0 and flood_rounds
    assert max(e["drafts"] for e in logged if e.get("event") == "batch_verified") == 4
    # Fairness in steps: every honest round (its prompt fits one prefill chunk) was answered in the step after
    # it arrived, the flooder's 16 older drafts notwithstanding.
    assert honest_rounds and max(e["steps_waited"] for e in honest_rounds) == 1
    assert all(e["kind"] == "verified" for e in honest_rounds)  # never refused, overloaded or resynced
    assert not [e for e in logged if e.get("event") == "session_evicted" and e["device_id"] in HONEST]
    assert not [e for e in logged if e.get("event") == "draft_refused" and e.get("device_id") in HONEST]
