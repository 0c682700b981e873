"""Operations: systemd units that pass systemd-analyze (deploy: tests/test_deploy.py), Prometheus metrics
scraped from both services, and the device's OpenAI-compatible API driven by the real openai client."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import openai
import pytest
from tokenizers import Tokenizer

from conftest import PROMPTS, ROOT, scrape
from sled_protocol.devbroker import free_port, wait_for_port

pytestmark = pytest.mark.integration


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_units_pass_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing: make setup installs the systemd package")
    prefix = tmp_path / "opt" / "sled"
    prefix.mkdir(parents=True)
    (prefix / "venv").symlink_to(ROOT / ".venv")  # ExecStart must name an existing executable
    done = make("install-units", f"DESTDIR={tmp_path / 'root'}", f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path / 'etc'}")
    assert done.returncode == 0, done.stderr
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    verifier_unit = (units / "sled-verifier.service").read_text()
    assert f"ExecStart={prefix}/venv/bin/sled-verifier" in verifier_unit and "RestartPreventExitStatus=78" in verifier_unit
    verify = subprocess.run(["systemd-analyze", "verify", str(units / "sled-verifier.service"),
                             str(units / "sled-edge@.service")], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr


@pytest.fixture(scope="module")
def edge_service(tiny_models, verifier, tmp_path_factory):
    """``sled-edge serve`` with the target's own export as draft (greedy output is the target's)."""
    http_port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("edge") / "edge.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", verifier.url, "--draft",
             str(tiny_models.target_onnx), "--device-id", "api-device", "--verifier", verifier.verifier_id,
             "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--model-name", "tiny-sled"],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_port(http_port, timeout_s=60)
        yield {"base_url": f"http://127.0.0.1:{http_port}/v1", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        process.terminate()
        process.wait(timeout=15)


def expected_text(tiny_models, reference, prompt: str, n: int) -> str:
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    return tokenizer.decode(reference(tokenizer.encode(prompt).ids, n), skip_special_tokens=False)


@pytest.fixture
def client(edge_service):
    with openai.OpenAI(base_url=edge_service["base_url"], api_key="unused") as client:
        yield client


def test_the_models_endpoint_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-sled"]


def test_a_completion_is_the_target_text(client, tiny_models, reference):
    completion = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    assert completion.choices[0].text == expected_text(tiny_models, reference, PROMPTS[1], 16)
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


def test_a_stream_is_the_same_text_in_chunks(client, tiny_models, reference):
    chunks = list(client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_text(tiny_models, reference, PROMPTS[1], 16)
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_sequence_cuts_the_text_before_it(client, tiny_models, reference):
    want = expected_text(tiny_models, reference, PROMPTS[1], 16)
    stop = want[5:9]
    cut = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == want[: want.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_stopped_session_is_closed_on_the_verifier(client, tiny_models, reference, verifier):
    """Not left to the verifier's LRU: the sessions it holds (its ``sled_verifier_sessions`` gauge, which counts
    finished sessions too until they are evicted) are back to what they were once the edge's Close is taken. The
    verifier is another process and a Close answers nothing, so the gauge is the signal, read for at most 5 s."""
    def held() -> float:
        return scrape(verifier.metrics_url)["sled_verifier_sessions"]

    before = held()
    want = expected_text(tiny_models, reference, PROMPTS[1], 16)
    client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[want[5:9]])
    deadline_s = time.monotonic() + 5
    while held() != before and time.monotonic() < deadline_s:
        time.sleep(0.1)
    assert held() == before


def test_a_seeded_chat_stream_answers_as_the_assistant(client):
    chat = client.chat.completions.create(model="tiny-sled", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0.7, seed=3, stream=True)
    deltas = [c.choices[0].delta for c in chat]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas)


def test_an_empty_prompt_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-sled", prompt="", max_tokens=4)


def test_concurrent_requests_are_concurrent_sessions(edge_service, tiny_models, reference):
    async def main():
        async with openai.AsyncOpenAI(base_url=edge_service["base_url"], api_key="unused") as client:
            return await asyncio.gather(*(client.completions.create(model="tiny-sled", prompt=p, max_tokens=12,
                                                                    temperature=0) for p in PROMPTS))

    results = asyncio.run(main())
    assert [r.choices[0].text for r in results] == [expected_text(tiny_models, reference, p, 12) for p in PROMPTS]


def test_both_services_export_prometheus_metrics(edge_service, verifier, client):
    """One request's figures in both services' counters: exactly what its ``usage`` reports (nothing else runs
    on this device or, meanwhile, on the verifier)."""
    edge_before, server_before = scrape(edge_service["metrics"]), scrape(verifier.metrics_url)
    usage = client.completions.create(model="tiny-sled", prompt="import", max_tokens=8, temperature=0).usage
    edge, server = scrape(edge_service["metrics"]), scrape(verifier.metrics_url)
    edge_delta = {name: edge[name] - edge_before.get(name, 0.0) for name in edge}
    server_delta = {name: server[name] - server_before.get(name, 0.0) for name in server}
    drafts, accepted = usage.num_drafts, usage.num_accepted_tokens
    assert drafts >= 1 and accepted == usage.num_draft_tokens  # the target's own export: every token accepted

    assert edge_delta["sled_edge_rounds_total"] == drafts and edge_delta["sled_edge_round_trip_seconds_count"] == drafts
    assert edge_delta["sled_edge_accepted_tokens_total"] == accepted
    assert server_delta["sled_verifier_drafts_total"] == drafts
    assert server_delta["sled_verifier_draft_tokens_total"] == usage.num_draft_tokens
    assert server_delta["sled_verifier_accepted_per_position_total[('position', '0')]"] == \
        usage.num_accepted_tokens_per_pos[0]
    assert server_delta["sled_verifier_queue_delay_seconds_count"] == drafts
    steps = server_delta["sled_verifier_batch_size_count"]
    assert 1 <= steps <= drafts and server_delta["sled_verifier_forward_seconds_count"] == steps
    assert server["sled_verifier_mean_acceptance_length"] == pytest.approx(
        1 + server["sled_verifier_accepted_tokens_total"] / server["sled_verifier_drafts_total"], abs=1e-3)
    assert server["sled_verifier_sessions"] >= 1  # this request's session, finished, still held for a retry
    assert server_delta["sled_verifier_loop_cpu_seconds_total"] > 0  # the event loop's own clock is read


def test_the_earliest_stop_sequence_wins():
    from sled_edge.api import CompletionRequest, Generation

    class Text:  # just enough of a device for the text bookkeeping: token ids are characters here
        def decode(self, tokens, skip_special_tokens=False):
            return "".join(chr(t) for t in tokens)

    run = Generation(Text(), CompletionRequest("p", 10, None, ("b", "a"), False), chat=False, model="m")
    assert run._on_tokens([ord(c) for c in "xab"]) is True and run.text == "x"
