"""Every crash says why: the real CLIs, run as subprocesses, log an exception's type, message and traceback in
JSON, and a port in use, a draft or target that does not load, or an unreadable CA certificate is one clear
``bad_configuration`` line and exit 78 (systemd does not restart a configuration error)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CRASH = """
import sys
import {module} as entry

async def crash(*args, **kwargs):
    raise RuntimeError("injected fault")

entry.{coroutine} = crash
sys.exit(entry.main(sys.argv[1:]))
"""


def run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)


def log_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def one_configuration_error(done: subprocess.CompletedProcess, *causes: str) -> None:
    assert done.returncode == 78, done.stderr
    errors = [line for line in log_lines(done.stderr) if line["level"] == "error"]
    assert [line["event"] for line in errors] == ["bad_configuration"], done.stderr
    assert all(cause.lower() in errors[0]["error"].lower() for cause in causes), errors[0]
    assert "exception" not in errors[0]  # a configuration error is its message, not a traceback


@pytest.fixture
def target_dir(tmp_path) -> Path:
    """A target directory that passes the config checks but holds no weights."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return target


@pytest.fixture
def draft_dir(tmp_path) -> Path:
    """A draft directory that passes the config checks; its model.onnx is not an ONNX model."""
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "model.onnx").write_bytes(b"\x00 not an onnx model")
    (draft / "tokenizer.json").write_text("{}")
    return draft


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_logged_exceptions_carry_type_message_and_traceback():
    script = """
import logging, structlog
from sled_protocol.logs import configure_logging
configure_logging("info", json_logs=True)
try:
    {}["missing"]
except KeyError:
    structlog.get_logger("ours").exception("ours_failed")
try:
    raise OSError(98, "Address already in use")
except OSError:
    logging.getLogger("aiohttp.server").exception("Error handling request")  # a foreign stdlib record
"""
    done = run("-c", script)
    ours, foreign = log_lines(done.stderr)
    for line, kind, message in [(ours, "KeyError", "'missing'"), (foreign, "OSError", "Address already in use")]:
        (exception,) = line["exception"]
        assert exception["exc_type"] == kind and message in exception["exc_value"]
        assert exception["frames"] and "locals" not in exception["frames"][0]  # no secrets from local variables


@pytest.mark.parametrize(("module", "coroutine", "args", "event"), [
    ("sled_verifier.__main__", "serve", ["--target", "{target}"], "verifier_crashed"),
    ("sled_edge.__main__", "run_generate", ["generate", "--draft", "{draft}", "--prompt", "x"], "edge_crashed"),
    ("sled_edge.__main__", "run_serve", ["serve", "--draft", "{draft}"], "edge_crashed"),
])
def test_a_crash_exits_70_and_logs_its_cause(module, coroutine, args, event, target_dir, draft_dir):
    args = [arg.format(target=target_dir, draft=draft_dir) for arg in args]
    done = run("-c", CRASH.format(module=module, coroutine=coroutine), *args)
    assert done.returncode == 70, done.stderr
    (crash,) = [line for line in log_lines(done.stderr) if line["event"] == event]
    (exception,) = crash["exception"]
    assert exception["exc_type"] == "RuntimeError" and exception["exc_value"] == "injected fault"
    assert any(frame["name"] == "crash" for frame in exception["frames"])


@pytest.mark.slow  # about 10 s or more on a 2-core machine
def test_verifier_metrics_port_in_use_exits_78(target_dir, taken_port):
    done = run("-m", "sled_verifier", "--target", str(target_dir), "--metrics-port", str(taken_port))
    one_configuration_error(done, f"127.0.0.1:{taken_port}", "metrics", "Address already in use")


def test_edge_metrics_port_in_use_exits_78(draft_dir, taken_port):
    done = run("-m", "sled_edge", "serve", "--draft", str(draft_dir), "--metrics-port", str(taken_port))
    one_configuration_error(done, f"127.0.0.1:{taken_port}", "Address already in use")


@pytest.mark.integration
def test_edge_api_port_in_use_exits_78(tiny_models, taken_port):
    done = run("-m", "sled_edge", "serve", "--draft", str(tiny_models.gpt2_onnx), "--metrics-port", "0",
               "--http-port", str(taken_port), "--mqtt-url", "mqtt://127.0.0.1:1")  # no broker needed to fail
    one_configuration_error(done, f"127.0.0.1:{taken_port}", "the API", "Address already in use")


@pytest.mark.slow  # about 10 s or more on a 2-core machine
def test_a_target_without_weights_exits_78(target_dir):
    done = run("-m", "sled_verifier", "--target", str(target_dir), "--metrics-port", "0")
    one_configuration_error(done, "cannot load target", str(target_dir))


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_draft_that_does_not_load_exits_78(draft_dir, command):
    done = run("-m", "sled_edge", command, "--draft", str(draft_dir), "--metrics-port", "0",
               *(["--prompt", "x"] if command == "generate" else []))
    one_configuration_error(done, "cannot load draft", str(draft_dir))


@pytest.mark.parametrize("content", [None, "not a certificate"])
@pytest.mark.parametrize("entry", ["verifier", "edge"])
def test_an_unreadable_ca_file_exits_78(entry, content, tmp_path, target_dir, draft_dir):
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_text(content)
    common = ["--mqtt-url", "mqtts://127.0.0.1:8883", "--ca-file", str(ca_file)]
    if entry == "verifier":
        done = run("-m", "sled_verifier", "--target", str(target_dir), *common)
    else:
        done = run("-m", "sled_edge", "generate", "--draft", str(draft_dir), "--prompt", "x", *common)
    one_configuration_error(done, "cannot read CA certificate", str(ca_file))
