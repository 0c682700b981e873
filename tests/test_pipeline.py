"""End to end through a real Mosquitto and a real verifier process: exact output, bad input refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import PROMPTS, ROOT, edge_config, scrape
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol import Draft, ErrorCode, SamplingParams, VerdictKind, decode_verdict, encode
from sled_protocol import topics
from sled_protocol.mqtt import make_client
from sled_protocol.transport import parse_broker_url
from sled_protocol.vocab import vocab_hash

pytestmark = pytest.mark.integration


async def misbehave(verifier, vocab: str) -> dict[str, object]:
    """Publish bad messages as a device and collect the verifier's answer to each."""
    device = f"bad-{uuid.uuid4().hex[:6]}"
    good = Draft(device_id=device, session_id="unknown_session", seq=0, base_len=2, tokens=(1, 2), max_len=10,
                 vocab=vocab)
    cases = {
        "garbage": b"\x00\xffnot msgpack",
        "unknown_session": encode(good),
        "vocab": encode(Draft(**{**good.__dict__, "session_id": "vocab", "vocab": "feedfacefeedface"})),
        "bad_token": encode(Draft(**{**good.__dict__, "session_id": "bad_token", "tokens": (1, 10**6)})),
        "oversized": encode(Draft(**{**good.__dict__, "session_id": "oversized", "tokens": tuple(range(200))})),
        "spoofed": encode(Draft(**{**good.__dict__, "session_id": "spoofed", "device_id": "someone-else"})),
        "nan_proposal": encode(Draft(**{**good.__dict__, "session_id": "nan_proposal", "sampling": SamplingParams(0.8),
                                        "q_ids": ((1, 3), (2,)), "q_probs": ((float("nan"), 0.5), (1.0,))})),
    }
    answers: dict[str, object] = {}
    async with make_client(parse_broker_url(verifier.url), f"bad-{device}") as client:
        await client.subscribe(topics.verdict_topic(device))
        for payload in cases.values():
            await client.publish(topics.draft_topic(verifier.verifier_id, device), payload)
        async with asyncio.timeout(20):
            async for message in client.messages:
                verdict = decode_verdict(bytes(message.payload))
                answers[verdict.session_id or "garbage"] = verdict
                if len(answers) == len(cases):
                    return answers
    return answers


@pytest.mark.asyncio
async def test_three_sessions_two_drafts_exact_while_bad_input_is_refused(tiny_models, each_verifier, reference, device_id):
    jetson = EdgeDevice(edge_config(each_verifier, tiny_models.target_onnx, f"{device_id}-a"))
    pi = EdgeDevice(edge_config(each_verifier, tiny_models.gpt2_onnx, f"{device_id}-b", draft_tokens=3))
    max_new = [40, 32, 24]
    errors_before = scrape(each_verifier.metrics_url)
    async with jetson, pi:
        prompts = [jetson.encode_prompt(PROMPTS[0]), jetson.encode_prompt(PROMPTS[1]), pi.encode_prompt(PROMPTS[3])]
        async with asyncio.TaskGroup() as group:
            runs = [
                group.create_task(jetson.generate(prompts[0], max_new[0])),
                group.create_task(jetson.generate(prompts[1], max_new[1])),
                group.create_task(pi.generate(prompts[2], max_new[2])),
            ]
            refusals = group.create_task(misbehave(each_verifier, jetson.vocab))
    results = [run.result() for run in runs]
    for result, prompt, n in zip(results, prompts, max_new):
        assert result.token_ids == reference(prompt, n)
        assert result.finish_reason == "length" and len(result.token_ids) == n
    assert results[0].acceptance_rate == 1.0 and results[1].acceptance_rate == 1.0
    assert results[2].acceptance_rate < 0.5 and results[2].rounds > results[0].rounds

    answers = refusals.result()
    assert answers["unknown_session"].kind is VerdictKind.RESYNC
    expected_errors = {"garbage": ErrorCode.MALFORMED, "vocab": ErrorCode.VOCAB_MISMATCH,
                       "bad_token": ErrorCode.BAD_TOKEN, "oversized": ErrorCode.TOO_LARGE,
                       "spoofed": ErrorCode.WRONG_DEVICE, "nan_proposal": ErrorCode.BAD_PROPOSAL}
    for name, code in expected_errors.items():
        assert answers[name].kind is VerdictKind.ERROR and answers[name].error is code, name
        assert answers[name].reason
    assert each_verifier.process.poll() is None
    # Each refusal counted once, under its own kind, in the verifier's metrics (and nothing else refused).
    errors = scrape(each_verifier.metrics_url)
    counted = {name: errors[name] - errors_before.get(name, 0.0) for name in errors
               if name.startswith("sled_verifier_errors_total")}
    assert {name: count for name, count in counted.items() if count} == {
        f"sled_verifier_errors_total[('kind', '{code}')]": 1 for code in expected_errors.values()}


@pytest.mark.asyncio
async def test_sampled_sessions_run_end_to_end_and_a_seed_reproduces_them(tiny_models, each_verifier, reference, device_id):
    pi = EdgeDevice(edge_config(each_verifier, tiny_models.gpt2_onnx, f"{device_id}-b", proposal_tokens=8))
    jetson = EdgeDevice(edge_config(each_verifier, tiny_models.target_onnx, f"{device_id}-a"))
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    async with pi, jetson:
        prompt = pi.encode_prompt(PROMPTS[1])
        async with asyncio.TaskGroup() as group:
            first = group.create_task(pi.generate(prompt, 24, sampling=seeded))
            other_seed = group.create_task(pi.generate(prompt, 24, sampling=SamplingParams(0.9, 50, 0.95, seed=99)))
            own_draft = group.create_task(jetson.generate(prompt, 24, sampling=seeded))
            greedy = group.create_task(jetson.generate(prompt, 24, sampling=SamplingParams(temperature=0.0, seed=5)))
        again = await pi.generate(prompt, 24, sampling=seeded)  # alone this time: another batch composition
    assert again.token_ids == first.result().token_ids and len(again.token_ids) == 24
    assert other_seed.result().token_ids != first.result().token_ids
    assert greedy.result().token_ids == reference(prompt, 24) and greedy.result().seed is None
    # The target's own export proposes nearly the target's own distribution: most of it is accepted.
    assert own_draft.result().acceptance_rate > 0.5 > first.result().acceptance_rate


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)


def inspector(verifier, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sled_protocol.inspect", "--mqtt-url", verifier.url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_cli_generate_json_and_inspect(tiny_models, verifier, reference, device_id):
    drafts = inspector(verifier, "--json", "--count", "4", "--device", device_id, "--type", "draft")
    verdicts = inspector(verifier, "--count", "3", "--device", device_id, "--type", "verdict")
    stats = inspector(verifier, "--stats", "--interval-s", "0.3", "--count", "8", "--device", device_id)
    for process in (drafts, verdicts, stats):  # each says when its subscription is in place
        assert "subscribed to" in process.stderr.readline()
    done = run_cli("-m", "sled_edge", "generate", "--mqtt-url", verifier.url, "--draft", str(tiny_models.gpt2_onnx),
                   "--prompt", PROMPTS[2], "--max-new-tokens", "16", "--device-id", device_id, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    from tokenizers import Tokenizer

    prompt_ids = Tokenizer.from_file(str(tiny_models.gpt2_onnx / "tokenizer.json")).encode(PROMPTS[2]).ids
    assert result["token_ids"] == reference(prompt_ids, 16)
    assert result["mean_acceptance_length"] == pytest.approx(1 + result["accepted_tokens"] / result["rounds"], abs=1e-3)
    assert result["mean_accepted_length"] == result["mean_acceptance_length"]  # the old key, kept for a release

    lines = [json.loads(line) for line in drafts.communicate(timeout=30)[0].splitlines()]
    assert [line["type"] for line in lines] == ["draft"] * 4
    assert lines[0]["context"] == prompt_ids and all(line["device"] == device_id for line in lines)
    plain = verdicts.communicate(timeout=30)[0].splitlines()
    assert len(plain) == 3 and all(f"verdicts/{device_id} verdict" in line and "kind=verified" in line for line in plain)
    assert all("rtt_ms=" in line and "acceptance=" in line for line in plain)  # matched to their drafts
    summary = stats.communicate(timeout=30)[0]
    assert "sessions" in summary and device_id[:20] in summary and result["session_id"] in summary


def test_cli_without_matching_verifier_exits_unavailable(tiny_models, verifier):
    done = run_cli("-m", "sled_edge", "generate", "--mqtt-url", verifier.url, "--draft", str(tiny_models.gpt2_onnx),
                   "--prompt", "x", "--verifier", "no-such-verifier", "--discovery-timeout-s", "0.5")
    assert done.returncode == 69
    assert "no_verifier" in done.stderr and verifier.verifier_id in done.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["-m", "sled_verifier", "--target", "/nonexistent"], "is not a directory"),
        (["-m", "sled_verifier", "--target", ".", "--max-wait-ms", "soon"], "not a valid float"),
        (["-m", "sled_edge", "generate", "--draft", "/nonexistent", "--prompt", "x"], "has no model.onnx"),
    ],
)
def test_bad_configuration_exits_78(args, complaint):
    done = run_cli(*args, timeout_s=60)
    assert done.returncode == 78 and complaint in done.stderr


def test_environment_variables_configure_the_edge(tiny_models, monkeypatch):
    from sled_edge.__main__ import build_parser
    from sled_protocol.config import config_from_args

    args = build_parser().parse_args(["generate", "--prompt", "x", "--draft-tokens", "7"])
    env = {"SLED_DRAFT": str(tiny_models.gpt2_onnx), "SLED_DRAFT_TOKENS": "2", "SLED_TIMEOUT_S": "1.5"}
    config = config_from_args(EdgeConfig, args, env)
    assert (config.draft_tokens, config.timeout_s, config.draft) == (7, 1.5, str(tiny_models.gpt2_onnx))
    assert vocab_hash(config.draft) == vocab_hash(tiny_models.target)
