"""Operations: systemd units that pass systemd-analyze (deploy: tests/test_deploy.py), Prometheus metrics
scraped from both services, and the device's OpenAI-compatible API driven by the real openai client."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from conftest import PROMPTS, ROOT
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


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {sample.name + str(sorted(sample.labels.items()) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


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
        yield {"base_url": f"http://127.0.0.1:{http_port}/v1", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "verifier_log": verifier.log_path}
    finally:
        process.terminate()
        process.wait(timeout=15)


def expected_text(tiny_models, reference, prompt: str, n: int) -> str:
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    return tokenizer.decode(reference(tokenizer.encode(prompt).ids, n), skip_special_tokens=False)


def test_openai_client_completes_and_streams_through_the_device(edge_service, tiny_models, reference):
    with openai.OpenAI(base_url=edge_service["base_url"], api_key="unused") as client:
        check_openai_client(client, tiny_models, reference, edge_service)


def check_openai_client(client, tiny_models, reference, edge_service):
    assert [m.id for m in client.models.list().data] == ["tiny-sled"]
    want = expected_text(tiny_models, reference, PROMPTS[1], 16)

    completion = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    assert completion.choices[0].text == want and completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"

    chunks = list(client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason == "length"

    stop = want[5:9]
    cut = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == want[: want.find(stop)] and cut.choices[0].finish_reason == "stop"
    verifier_log = edge_service["verifier_log"]
    for _ in range(50):  # the stopped session was closed on the verifier, not left to its LRU
        if "session_closed" in verifier_log.read_text():
            break
        time.sleep(0.1)
    assert "session_closed" in verifier_log.read_text()

    chat = client.chat.completions.create(model="tiny-sled", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0.7, seed=3, stream=True)
    deltas = [c.choices[0].delta for c in chat]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas)

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-sled", prompt="", max_tokens=4)


def test_concurrent_requests_are_concurrent_sessions(edge_service, tiny_models, reference):
    async def main():
        async with openai.AsyncOpenAI(base_url=edge_service["base_url"], api_key="unused") as client:
            return await asyncio.gather(*(client.completions.create(model="tiny-sled", prompt=p, max_tokens=12,
                                                                    temperature=0) for p in PROMPTS))

    results = asyncio.run(main())
    assert [r.choices[0].text for r in results] == [expected_text(tiny_models, reference, p, 12) for p in PROMPTS]


def test_both_services_export_prometheus_metrics(edge_service, verifier):
    with openai.OpenAI(base_url=edge_service["base_url"], api_key="unused") as client:
        client.completions.create(model="tiny-sled", prompt="import", max_tokens=8, temperature=0)
    edge = scrape(edge_service["metrics"])
    assert edge["sled_edge_rounds_total"] > 0 and edge["sled_edge_round_trip_seconds_count"] > 0
    assert edge["sled_edge_accepted_tokens_total"] > 0
    server = scrape(verifier.metrics_url)
    assert server["sled_verifier_drafts_total"] > 0 and server["sled_verifier_draft_tokens_total"] > 0
    assert server["sled_verifier_mean_acceptance_length"] > 1
    assert server["sled_verifier_batch_size_count"] > 0 and server["sled_verifier_forward_seconds_count"] > 0
    assert server["sled_verifier_queue_delay_seconds_count"] > 0 and "sled_verifier_sessions" in server
    assert server["sled_verifier_accepted_per_position_total[('position', '0')]"] > 0


def test_the_earliest_stop_sequence_wins():
    from sled_edge.api import CompletionRequest, Generation

    class Text:  # just enough of a device for the text bookkeeping: token ids are characters here
        def decode(self, tokens, skip_special_tokens=False):
            return "".join(chr(t) for t in tokens)

    run = Generation(Text(), CompletionRequest("p", 10, None, ("b", "a"), False), chat=False, model="m")
    assert run._on_tokens([ord(c) for c in "xab"]) is True and run.text == "x"
