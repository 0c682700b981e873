"""The core stays pure: importing it pulls in no MQTT, no ONNX Runtime and (torch aside) no event loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SHELL = ["aiomqtt", "paho", "onnxruntime", "sled_verifier.service", "sled_edge.client"]


def loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        # Plain-Python core: not even asyncio.
        (["sled_verifier.scheduler", "sled_verifier.sessions", "sled_verifier.stats", "sled_edge.session",
          "sled_edge.drafter", "sled_edge.placement", "sled_protocol.messages", "sled_protocol.topics",
          "sled_verifier.identity"], ["asyncio", *SHELL]),
        # torch itself imports asyncio, so the tensor maths is checked for the shell only.
        (["sled_verifier.verify"], SHELL),
    ],
    ids=["plain", "tensor"],
)
def test_core_imports_no_shell(modules, forbidden):
    assert loaded_after_import(modules, forbidden) == []
