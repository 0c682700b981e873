"""The device API as vLLM guards its own (issue 19, item 8) and what the real model showed it (issue 20, item 4),
through a real ``sled-edge serve``, broker and verifier: a bearer token, JSON bodies only, the Host header
(DNS rebinding), a cap on concurrent generations answered 429, chat templates rendered off the event loop
under a time limit; special tokens out of the text unless a request keeps them; a request that arrives before
any verifier waits for one within its own deadline."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import openai
import pytest
from tokenizers import Tokenizer

from conftest import PROMPTS, ROOT, start_verifier
from sled_edge.api import CompletionRequest, Generation
from sled_edge.api_guard import allowed_hosts, host_allowed, host_of
from sled_protocol.devbroker import free_port, wait_for_port

API_KEY = "test-key-" + uuid.uuid4().hex
# Two loops of range(100000) per message: 10^10 steps, which only the render's time limit ends.
SLOW_TEMPLATE = ("{% for message in messages %}{% for i in range(100000) %}{% for j in range(100000) %}"
                 "{% endfor %}{% endfor %}{{ message['content'] }}{% endfor %}")


# -- the Host header: pure tables ---------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("LOCALHOST", "localhost"), ("[::1]:8080", "::1"), ("[::1]", "::1"),
    ("evil.example.:80", "evil.example"), ("pi5.lan", "pi5.lan"),
])
def test_host_of(header, host):
    assert host_of(header) == host


@pytest.mark.parametrize(("bound", "configured", "header", "allowed"), [
    ("127.0.0.1", "", "127.0.0.1:8080", True),
    ("127.0.0.1", "", "localhost:8080", True),
    ("127.0.0.1", "", "[::1]:8080", True),
    ("127.0.0.1", "", "evil.example:8080", False),       # DNS rebinding: a foreign name on our address
    ("127.0.0.1", "", "192.168.1.7:8080", False),
    ("127.0.0.1", "pi5.lan", "pi5.lan:8080", True),
    ("127.0.0.1", "*", "evil.example", True),            # the check turned off
    ("192.168.1.7", "", "192.168.1.7:8080", True),
    ("192.168.1.7", "", "localhost:8080", False),        # not bound to loopback
    ("0.0.0.0", "", "10.0.0.3:8080", True),              # every address: any IP literal...
    ("0.0.0.0", "", "[fe80::1]:8080", True),
    ("0.0.0.0", "", "localhost", True),
    ("0.0.0.0", "", "evil.example", False),              # ...but no name it was not given
    ("::", "kiosk.local", "kiosk.local", True),
    ("127.0.0.1", "", None, True),                       # no Host header: not a browser
])
def test_host_allowed(bound, configured, header, allowed):
    assert host_allowed(header, allowed_hosts(bound, configured)) is allowed


# -- special tokens in the text: the real tiny tokenizer ----------------------------------------------------

class TokenizerDevice:
    """The text side of an EdgeDevice: the real tokenizer's decode, nothing else (Generation's bookkeeping)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, tokens, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("skip", [True, False])
def test_the_text_leaves_out_the_eos_unless_asked(tiny_models, skip):
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode("import os").ids + [eos]  # a generation that ended on its EOS
    run = Generation(TokenizerDevice(tokenizer), CompletionRequest("p", 8, None, (), False, skip_special_tokens=skip),
                     chat=False, model="m")
    run._on_tokens(ids)
    assert run.text == ("import os" if skip else "import os<|endoftext|>")


# -- the real service -----------------------------------------------------------------------------------------

def serve(draft: Path, url: str, log_path: Path, *flags: str) -> tuple[subprocess.Popen, int, int]:
    http_port, metrics_port = free_port(), free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", url, "--draft", str(draft), "--device-id",
             f"guard-{uuid.uuid4().hex[:8]}", "--http-port", str(http_port), "--metrics-port", str(metrics_port),
             "--model-name", "tiny-sled", "--discovery-timeout-s", "1", *flags],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_port(http_port, timeout_s=60)
    return process, http_port, metrics_port


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=15)


@pytest.fixture(scope="module")
def guarded(tiny_models, verifier, tmp_path_factory):
    """A device API with a key, a cap of one generation, and a chat template that never finishes alone."""
    root = tmp_path_factory.mktemp("guarded")
    slow = root / "slow-template-draft"
    shutil.copytree(tiny_models.target_onnx, slow)
    (slow / "chat_template.jinja").write_text(SLOW_TEMPLATE)
    process, port, _ = serve(slow, verifier.url, root / "edge.log", "--verifier", verifier.verifier_id,
                             "--api-key", API_KEY, "--max-concurrent-requests", "1")
    yield f"http://127.0.0.1:{port}"
    stop(process)


async def post(base: str, path: str, body: bytes | dict, headers: dict[str, str]) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as session, session.post(base + path, data=data, headers=headers) as answer:
        return answer.status, await answer.json()


BEARER = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
COMPLETION = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}


@pytest.mark.asyncio
@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({"Content-Type": "application/json"}, COMPLETION, 401, "invalid_api_key"),          # no key
    ({**BEARER, "Authorization": "Bearer wrong"}, COMPLETION, 401, "invalid_api_key"),
    ({**BEARER, "Authorization": API_KEY}, COMPLETION, 401, "invalid_api_key"),         # not a bearer token
    ({**BEARER, "Content-Type": "text/plain"}, json.dumps(COMPLETION).encode(), 415, "unsupported_media_type"),
    ({"Authorization": BEARER["Authorization"]}, b"{}", 415, "unsupported_media_type"),  # none given
    ({**BEARER, "Host": "evil.example"}, COMPLETION, 400, "host_not_allowed"),
    ({**BEARER, "Host": "evil.example:8080", "Authorization": ""}, COMPLETION, 400, "host_not_allowed"),
], ids=["no-key", "wrong-key", "no-bearer", "text-plain", "no-content-type", "rebound-host", "rebound-host-no-key"])
async def test_the_guard_refuses(guarded, headers, body, status, code):
    answered, answer = await post(guarded, "/v1/completions", body, headers)
    assert (answered, answer["error"]["code"]) == (status, code)


def test_with_its_key_the_openai_client_is_served(guarded, tiny_models, reference):
    with openai.OpenAI(base_url=f"{guarded}/v1", api_key=API_KEY, max_retries=0) as client:
        completion = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
        prompt = tokenizer.encode(PROMPTS[1]).ids
        assert completion.choices[0].text == tokenizer.decode(reference(prompt, 8))
        assert [m.id for m in client.models.list().data] == ["tiny-sled"]
    with openai.OpenAI(base_url=f"{guarded}/v1", api_key="not-the-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.asyncio
async def test_a_generation_past_the_cap_is_answered_429(guarded):
    """A chat whose template renders until its time limit holds the one place; a completion meanwhile gets 429."""
    assert (await post(guarded, "/v1/completions", COMPLETION, BEARER))[0] == 200  # warm: the first one is slow
    for _ in range(10):  # until the completion comes second (else it is served and the chat is the one refused)
        chat = asyncio.create_task(post(guarded, "/v1/chat/completions", CHAT, BEARER))
        await asyncio.sleep(0.1)
        status, answer = await post(guarded, "/v1/completions", COMPLETION, BEARER)
        if status != 200:
            break
        await chat
    assert status == 429 and answer["error"]["code"] == "too_many_requests" and answer["error"]["type"] == "rate_limit_error"
    assert (await chat)[0] == 400
    assert (await post(guarded, "/v1/completions", COMPLETION, BEARER))[0] == 200  # the place is free again


@pytest.mark.asyncio
async def test_a_chat_template_renders_off_the_event_loop_and_is_stopped(guarded):
    chat = asyncio.create_task(post(guarded, "/v1/chat/completions", CHAT, BEARER))
    async with aiohttp.ClientSession(headers=BEARER) as session:
        await asyncio.sleep(0.2)  # the render under way
        async with session.get(f"{guarded}/v1/models") as models:
            assert models.status == 200
    assert not chat.done()  # the API answered while the template was still rendering
    status, answer = await chat
    assert status == 400 and "time limit" in answer["error"]["message"]


def special_draft(tiny_models, reference, root: Path) -> tuple[Path, list[int], str]:
    """A copy of the target's export whose tokenizer marks a token of the greedy continuation of PROMPTS[1] as a
    special token (its id unchanged, so the vocabulary hash and the verifier are the same): what an EOS such as
    SmolLM2's <|im_end|> is in its tokenizer. Returns the draft, the prompt ids and the special token."""
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPTS[1]).ids
    continuation = reference(prompt, 12)
    words = [tokenizer.id_to_token(t) for t in continuation]
    special = next((w for w in words if w.isascii() and w.isalpha() and w not in PROMPTS[1]), None)
    assert special is not None, f"no plain word to mark special in the continuation {words}"
    draft = root / "special-draft"
    shutil.copytree(tiny_models.target_onnx, draft)
    config = json.loads((draft / "tokenizer.json").read_text())
    config["added_tokens"].append({"id": tokenizer.token_to_id(special), "content": special, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (draft / "tokenizer.json").write_text(json.dumps(config))
    return draft, prompt, special


def test_special_tokens_stay_out_of_api_text_unless_asked(tiny_models, reference, verifier, tmp_path):
    draft, prompt, special = special_draft(tiny_models, reference, tmp_path)
    marked = Tokenizer.from_file(str(draft / "tokenizer.json"))
    assert marked.encode(PROMPTS[1]).ids == prompt  # the prompt does not hold the token: same ids either way
    ids = reference(prompt, 12)
    process, port, _ = serve(draft, verifier.url, tmp_path / "edge.log", "--verifier", verifier.verifier_id)
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            ask = dict(model="tiny-sled", prompt=PROMPTS[1], max_tokens=12, temperature=0)
            plain = client.completions.create(**ask).choices[0].text
            kept = client.completions.create(**ask, extra_body={"skip_special_tokens": False}).choices[0].text
            streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True))
            chat = client.chat.completions.create(model="tiny-sled", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=12, temperature=0, extra_body={"skip_special_tokens": True})
            with pytest.raises(openai.BadRequestError, match="skip_special_tokens"):
                client.completions.create(**ask, extra_body={"skip_special_tokens": "no"})
    finally:
        stop(process)
    assert special in kept and special not in plain
    assert plain == streamed == marked.decode(ids, skip_special_tokens=True)
    assert kept == marked.decode(ids, skip_special_tokens=False)
    assert special not in chat.choices[0].message.content


def test_a_request_sent_before_the_verifier_is_up_waits_for_it(broker, tiny_models, reference, tmp_path):
    """The device API starts first; a request arrives with no verifier online; the verifier starts (loading its
    target) after it; the request is served, exactly, instead of 503 no_verifier after discovery_timeout_s."""
    verifier_id = f"late-{uuid.uuid4().hex[:6]}"
    process, port, metrics_port = serve(tiny_models.target_onnx, broker.url, tmp_path / "edge.log",
                                        "--verifier", verifier_id, "--request-timeout-s", "120")
    late = None
    try:
        async def request_then_verifier():
            async with aiohttp.ClientSession() as session:
                answer = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/v1/completions",
                                                          json={**COMPLETION, "max_tokens": 8}))
                while not await in_flight(session, metrics_port):
                    await asyncio.sleep(0.05)
                nonlocal late
                late = await asyncio.to_thread(start_verifier, broker, tiny_models.target, tmp_path, verifier_id)
                async with await answer as response:
                    return response.status, await response.json()

        status, body = asyncio.run(request_then_verifier())
    finally:
        stop(process)
        if late is not None:
            stop(late.process)
    assert status == 200, body
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    assert body["choices"][0]["text"] == tokenizer.decode(reference(tokenizer.encode(PROMPTS[0]).ids, 8))
    assert body["sled"]["verifier"] == verifier_id
    sled = body["sled"]  # the names before issue 23 stay beside the new ones for a release
    assert (sled["mean_accepted_length"], sled["proactive_rounds"]) == (sled["mean_acceptance_length"], sled["guesses_held"])


async def in_flight(session: aiohttp.ClientSession, metrics_port: int) -> bool:
    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as metrics:
        text = await metrics.text()
    return any(line.startswith("sled_edge_active_sessions ") and float(line.split()[1]) > 0
               for line in text.splitlines())


def test_the_wait_ends_at_the_requests_own_deadline(broker, tiny_models, tmp_path):
    process, port, _ = serve(tiny_models.target_onnx, broker.url, tmp_path / "edge.log", "--verifier", "nobody")
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model="tiny-sled", prompt="x", max_tokens=2, extra_body={"timeout": 0.3})
    finally:
        stop(process)
    assert refused.value.status_code == 503 and "within 0.3 s" in refused.value.message
