"""The device's API, driven by the real openai client against ``sled-edge serve``, a real broker and verifier:
every answer carries its acceptance figures (vLLM's names, in ``usage``; a stream in its final chunk), and a
chat request is laid out by the model's own chat template when its tokenizer has one (and says so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import openai
import pytest
from tokenizers import Tokenizer

from conftest import PROMPTS, ROOT
from sled_protocol.devbroker import free_port, wait_for_port

pytestmark = pytest.mark.integration

# Llama 3's layout with the tiny tokenizer's own special token as BOS, refusing tool messages.
TEMPLATE = ("{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
            "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
            " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
            "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
RENDERED = ("<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
SPEC_DECODE = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos",
               "mean_acceptance_length", "draft_acceptance_rate")


def serve(draft, verifier, log_path):
    http_port = free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", verifier.url, "--draft", str(draft),
             "--device-id", f"api-{log_path.stem}", "--verifier", verifier.verifier_id, "--http-port", str(http_port),
             "--metrics-port", "0", "--model-name", "tiny-sled"],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_port(http_port, timeout_s=60)
    return process, f"http://127.0.0.1:{http_port}/v1"


@pytest.fixture(scope="module")
def apis(tiny_models, verifier, tmp_path_factory):
    """Two devices drafting with the target's own export: its tokenizer as built (no template), and a copy
    given ``TEMPLATE`` as ``chat_template.jinja``."""
    root = tmp_path_factory.mktemp("api")
    templated = root / "templated-draft"
    shutil.copytree(tiny_models.target_onnx, templated)
    (templated / "chat_template.jinja").write_text(TEMPLATE)
    running = [serve(tiny_models.target_onnx, verifier, root / "plain.log"), serve(templated, verifier, root / "templated.log")]
    try:
        yield {"plain": running[0][1], "templated": running[1][1]}
    finally:
        for process, _ in running:
            process.terminate()
            process.wait(timeout=15)


def check_spec_decode(usage: dict, sled: dict) -> None:
    assert usage["num_drafts"] == sled["rounds"] > 0
    assert usage["num_accepted_tokens"] == sum(usage["num_accepted_tokens_per_pos"]) <= usage["num_draft_tokens"]
    assert usage["mean_acceptance_length"] == pytest.approx(1 + usage["num_accepted_tokens"] / usage["num_drafts"], abs=1e-3)
    assert usage["mean_acceptance_length"] == pytest.approx(sled["mean_acceptance_length"], abs=1e-3)
    assert usage["draft_acceptance_rate"] == pytest.approx(usage["num_accepted_tokens"] / usage["num_draft_tokens"], abs=1e-3)
    assert usage["draft_acceptance_rate"] == pytest.approx(sled["acceptance_rate"], abs=1e-3)
    # The target's own export drafts the target's tokens: every draft token is accepted.
    assert usage["draft_acceptance_rate"] == 1.0 and usage["mean_acceptance_length"] > 2


def test_every_answer_carries_its_acceptance(apis):
    with openai.OpenAI(base_url=apis["plain"], api_key="unused") as client:
        completion = client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0)
        usage, sled = completion.usage.model_dump(), completion.model_extra["sled"]
        assert usage["completion_tokens"] == 16 and sled["prompt_format"] == "completion"
        check_spec_decode(usage, sled)

        chunks = list(client.completions.create(model="tiny-sled", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                                stream=True))
        assert all(chunk.usage is None for chunk in chunks[:-1]) and chunks[-1].usage is not None
        assert chunks[-1].choices[0].finish_reason == "length"
        usage, sled = chunks[-1].usage.model_dump(), chunks[-1].model_extra["sled"]
        assert usage["completion_tokens"] == 16 and "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
        check_spec_decode(usage, sled)

        chat = list(client.chat.completions.create(model="tiny-sled", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=8, temperature=0.7, seed=3, stream=True))
        usage, sled = chat[-1].usage.model_dump(), chat[-1].model_extra["sled"]
        assert sled["prompt_format"] == "plain" and sled["seed"] == 3 and usage["num_drafts"] == sled["rounds"] > 0


def test_chat_uses_the_models_chat_template(apis, tiny_models, reference):
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    prompt_ids = tokenizer.encode(RENDERED, add_special_tokens=False).ids
    assert prompt_ids[0] == tokenizer.token_to_id("<|endoftext|>")  # the BOS is the special token, not its spelling
    want = tokenizer.decode(reference(prompt_ids, 12), skip_special_tokens=False)
    with openai.OpenAI(base_url=apis["templated"], api_key="unused") as client:
        chat = client.chat.completions.create(model="tiny-sled", messages=[{"role": "user", "content": " hi \n"}],
                                              max_tokens=12, temperature=0)
        assert chat.model_extra["sled"]["prompt_format"] == "chat_template"
        assert chat.usage.prompt_tokens == len(prompt_ids) and chat.choices[0].message.content == want
        check_spec_decode(chat.usage.model_dump(), chat.model_extra["sled"])
        completion = client.completions.create(model="tiny-sled", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert completion.model_extra["sled"]["prompt_format"] == "completion"  # a completion is never templated
        with pytest.raises(openai.BadRequestError, match="no tools here"):
            client.chat.completions.create(model="tiny-sled", messages=[{"role": "tool", "content": "x"}], max_tokens=4)
