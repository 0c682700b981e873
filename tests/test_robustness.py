"""Robustness found in review, without a broker: a temperature whose warping overflows and non-finite logits
never give NaN probabilities (at either end), every edge duration option is validated, and the device API
answers its own failures with 5xx and a JSON error, and only bad requests with 400."""

from __future__ import annotations

import math
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from sled_edge.api import Api
from sled_edge.client import EdgeError
from sled_edge.config import EdgeConfig
from sled_edge.proposal import sparse_proposal, warp_probs as edge_warp
from sled_protocol import Draft, SamplingParams, decode_draft, encode
from sled_protocol.config import ConfigError
from sled_verifier.sampling import SampledRows, rejection_sample, warp_probs

INF, NAN = float("inf"), float("nan")


def verifier_warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    rows = logits.shape[0]
    return warp_probs(logits, torch.full((rows,), temperature), torch.full((rows,), top_k), torch.full((rows,), top_p))


# -- temperature and logits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-5, 9.99e-5])
def test_a_vanishing_temperature_is_greedy_at_both_ends(temperature):
    assert SamplingParams(temperature, top_k=5, seed=3).temperature == 0.0  # the edge drafts greedily
    draft = Draft(device_id="d", session_id="s", seq=0, base_len=1, tokens=(2,), max_len=9, vocab="v", context=(1,),
                  sampling=SamplingParams(1.0, seed=3))
    body = msgpack.unpackb(encode(draft))
    body["sampling"]["temperature"] = temperature  # as another client might send it
    assert decode_draft(msgpack.packb(body)).sampling.temperature == 0.0  # the verifier verifies greedily


def test_a_usable_small_temperature_still_samples():
    assert SamplingParams(1e-3).temperature == pytest.approx(1e-3)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.9)])
def test_warping_that_overflows_is_the_greedy_limit_not_nan(top_k, top_p):
    logits = torch.tensor([[1.0, 50.0, -3.0, 49.0], [30.0, 30.0, 2.0, -1.0], [-5.0, -2.0, -9.0, -2.5]])
    # The warp itself, below SamplingParams' floor: 1 / 1e-39 overflows float32.
    probs = verifier_warp(logits, 1e-39, top_k, top_p)
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probs[1].tolist() == [0.5, 0.5, 0.0, 0.0]  # a tie at the top: the limit splits evenly
    assert probs[2].tolist() == [0.0, 1.0, 0.0, 0.0]  # every score overflowed to -inf
    unfloored = SimpleNamespace(temperature=1e-39, top_k=top_k, top_p=top_p)
    for row in range(3):
        edge = edge_warp(logits[row].numpy(), unfloored)
        assert np.isfinite(edge).all() and np.allclose(edge, probs[row].numpy())


def test_non_finite_logits_never_give_nan_probabilities():
    logits = torch.tensor([
        [NAN, 2.0, 1.0, 0.0],       # a NaN logit is no candidate
        [1.0, INF, 3.0, INF],       # +inf logits: the greedy limit among them
        [-INF, 0.0, -INF, -INF],    # only one usable logit
        [NAN, NAN, -INF, NAN],      # nothing usable: no distribution (all zeros)
    ])
    probs = verifier_warp(logits, 0.8, top_k=3, top_p=0.95)
    assert torch.isfinite(probs).all()
    assert probs[0, 0] == 0 and probs[0].sum() == pytest.approx(1.0)
    assert probs[1].tolist() == [0.0, 0.5, 0.0, 0.5]
    assert probs[2].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probs[3].tolist() == [0.0, 0.0, 0.0, 0.0]
    for row in range(4):  # the edge's proposal is always a distribution (uniform when nothing is usable)
        edge = edge_warp(logits[row].numpy(), SamplingParams(0.8, 3, 0.95))
        assert np.isfinite(edge).all() and math.isclose(float(edge.sum()), 1.0, rel_tol=1e-5)
        proposal = sparse_proposal(edge, 2)
        assert proposal.ids and all(math.isfinite(q) for q in proposal.probs)
    assert np.allclose(edge_warp(logits[3].numpy(), SamplingParams(0.8)), 0.25)


def rejection(probs: torch.Tensor, draft_len: int):
    """One draft of ``draft_len`` tokens (token 1 each) over target rows ``probs`` [K+1, V], point-mass proposal."""
    k = probs.shape[0] - 1
    draft_ids = torch.tensor([[1] * draft_len + [-1] * (k - draft_len)])
    q_ids = torch.ones(1, k, 1, dtype=torch.int64)
    q_probs = torch.ones(1, k, 1, dtype=torch.float64)
    rows = SampledRows(probs=probs[None], draft_ids=draft_ids, draft_lens=torch.tensor([draft_len]), q_ids=q_ids,
                       q_probs=q_probs, uniforms=torch.full((1, k + 1), 0.5, dtype=torch.float64),
                       budgets=torch.tensor([10]))
    return rejection_sample(rows, torch.tensor([99]))


def test_a_position_without_a_distribution_is_refused_only_when_read():
    good = torch.tensor([0.0, 1.0, 0.0, 0.0])
    empty = torch.zeros(4)
    result = rejection(torch.stack([good, good, empty]), draft_len=1)  # row 2 is padding: never read
    assert result.accepted.tolist() == [1] and result.next_token.tolist() == [1]
    with pytest.raises(ValueError, match="no finite value"):
        rejection(torch.stack([good, empty, empty]), draft_len=1)


# -- edge configuration -------------------------------------------------------------------------------------

@pytest.fixture
def draft_dir(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("name", ["timeout_s", "outage_timeout_s", "discovery_timeout_s"])
@pytest.mark.parametrize("value", [0.0, -1.0, NAN, INF])
def test_every_edge_duration_is_validated(draft_dir, name, value):
    with pytest.raises(ConfigError, match=name):
        EdgeConfig(draft=str(draft_dir), **{name: value})


@pytest.mark.parametrize(("argv", "environ"), [
    (["--k-max", "3"], {}), (["--max-draft-tokens", "3"], {}), ([], {"SLED_K_MAX": "3"}),
    ([], {"SLED_MAX_DRAFT_TOKENS": "3"}), (["--k-max", "3"], {"SLED_MAX_DRAFT_TOKENS": "5"}),
])
def test_a_renamed_option_keeps_its_old_flag_and_variable(draft_dir, argv, environ):
    """k_max was max_draft_tokens (the verifier's wire limit has that name): the old flag and variable still work."""
    import argparse

    from sled_protocol.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EdgeConfig)
    assert config_from_args(EdgeConfig, parser.parse_args(["--draft", str(draft_dir), *argv]), environ).k_max == 3


def test_an_unreadable_ca_file_is_a_configuration_error(draft_dir, tmp_path):
    with pytest.raises(ConfigError, match="nonexistent.pem"):
        EdgeConfig(draft=str(draft_dir), mqtt_url="mqtts://broker", ca_file=str(tmp_path / "nonexistent.pem"))
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="garbage.pem"):
        EdgeConfig(draft=str(draft_dir), mqtt_url="mqtts://broker", ca_file=str(tmp_path / "garbage.pem"))


# -- the device API -----------------------------------------------------------------------------------------

class FakeConfig:
    device_id = "fake"


class FakeDevice:
    """What the API needs from an EdgeDevice; ``failure`` is what generate raises."""

    config = FakeConfig()

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def encode_prompt(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt.strip()]

    def decode(self, tokens) -> str:
        return "".join(map(chr, tokens))

    async def generate(self, *args, **kwargs):
        raise self.failure


async def post(failure: BaseException, body: object, path: str = "/v1/completions", raw: bytes | None = None):
    app = Api(FakeDevice(failure), "m").app()
    async with TestClient(TestServer(app)) as client:
        response = await client.post(path, json=body) if raw is None else await client.post(
            path, data=raw, headers={"Content-Type": "application/json"})  # a JSON request whose body is not
        return response.status, await response.json()


@pytest.mark.asyncio
@pytest.mark.parametrize(("failure", "status", "code"), [
    (RuntimeError("onnxruntime fell over"), 500, "internal"),
    (ValueError("a bug, not the request's fault"), 500, "internal"),
    (EdgeError("no_verifier", "none online"), 503, "no_verifier"),
    (EdgeError("overloaded", "busy for too long"), 503, "overloaded"),
    (EdgeError("too_large", "prompt fills the context"), 400, "too_large"),
])
async def test_api_answers_failures_with_json_and_the_right_status(failure, status, code):
    answered, body = await post(failure, {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert answered == status and body["error"]["code"] == code and body["error"]["message"]
    assert body["error"]["type"] == ("invalid_request_error" if status == 400 else "server_error")


@pytest.mark.asyncio
@pytest.mark.parametrize("body, raw", [
    ({"prompt": "hello", "temperature": 3}, None),
    ({"prompt": "   "}, None),                    # encodes to no tokens
    (None, b"{not json"),
    (None, b"\xff\xfe"),                           # not UTF-8
])
async def test_api_answers_bad_requests_with_400(body, raw):
    answered, answer = await post(RuntimeError("never reached"), body, raw=raw)
    assert answered == 400 and answer["error"]["type"] == "invalid_request_error"


def test_every_help_renders():
    """argparse %-formats help text: one literal '%' in a field's help or default (--kv-memory's "50%") made
    ``sled-verifier --help`` raise instead of printing."""
    import argparse

    from sled_edge.__main__ import build_parser as edge_parser
    from sled_verifier.__main__ import build_parser as verifier_parser

    assert "default '50%'" in " ".join(verifier_parser().format_help().split())
    edge = edge_parser()
    [commands] = [action for action in edge._actions if isinstance(action, argparse._SubParsersAction)]
    for command in commands.choices.values():
        assert "--mqtt-url" in command.format_help()


def test_a_stop_that_does_not_unwind_ends_after_its_grace(tmp_path):
    """SIGTERM cancels the service's task; a task that never finishes unwinding (here: one that swallows the
    cancellation, as a connection torn down mid-read once did) no longer keeps the process alive until systemd's
    SIGKILL: after the grace it ends with status 0 and says ``stop_timed_out``."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "stubborn.py"
    script.write_text(
        "import asyncio\nfrom sled_protocol.logs import configure_logging\nfrom sled_protocol.run import run_until_signal\n"
        "configure_logging(json_logs=True)\n"
        "async def main():\n"
        "    print('up', flush=True)\n"
        "    while True:\n"
        "        try:\n"
        "            await asyncio.sleep(3600)\n"
        "        except asyncio.CancelledError:\n"
        "            pass\n"
        "run_until_signal(main(), grace_s=0.5)\n")
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert process.stdout.readline().strip() == "up"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)  # closes both pipes
    process.stdout.close()
    assert process.returncode == 0 and "stop_timed_out" in err, err
