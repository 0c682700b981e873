"""The core stays pure: importing it pulls in no MQTT, no ONNX Runtime and (torch aside) no event loop; and only
the protocol package talks to aiomqtt (everything else goes through the transport seam)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import ROOT

SHELL = ["aiomqtt", "paho", "onnxruntime", "sled_verifier.service", "sled_edge.client", "sled_edge.connection",
         "sled_edge.round_trip", "sled_edge.directory"]

# Every module of the pure core: maths, policies, bookkeeping, the wire agreement and configuration.
PLAIN = [
    "sled_edge.ahead", "sled_edge.config", "sled_edge.controller", "sled_edge.drafter", "sled_edge.errors",
    "sled_edge.placement", "sled_edge.proposal", "sled_edge.session",
    "sled_protocol.acceptance", "sled_protocol.codec", "sled_protocol.config", "sled_protocol.exitcodes",
    "sled_protocol.seeding", "sled_protocol.topics", "sled_protocol.transport", "sled_protocol.types",
    "sled_protocol.vocab",
    "sled_verifier.config", "sled_verifier.draft_queue", "sled_verifier.fairshare", "sled_verifier.identity", "sled_verifier.ratelimit",
    "sled_verifier.scheduler", "sled_verifier.sessions", "sled_verifier.stats",
]
# The verification maths and its batch assembly (torch itself imports asyncio).
TENSOR = ["sled_verifier.rows", "sled_verifier.decide", "sled_verifier.invariant", "sled_verifier.sampling",
          "sled_verifier.verify"]
SEAM = ["sled_protocol.connection", "sled_protocol.memory", "sled_protocol.transport"]  # asyncio, but no broker library


def loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [(PLAIN, ["asyncio", "torch", *SHELL]), (TENSOR, SHELL), (SEAM, SHELL)],
    ids=["plain", "tensor", "transport-seam"],
)
def test_core_imports_no_shell(modules, forbidden):
    assert loaded_after_import(modules, forbidden) == []


@pytest.mark.slow
@pytest.mark.parametrize("module", PLAIN)
def test_each_plain_module_is_pure_on_its_own(module):
    """One at a time too: a module that is pure only because another was imported first would slip through."""
    assert loaded_after_import([module], ["asyncio", "torch", *SHELL]) == []


def imported_modules(path, *, whole: bool = False) -> set[str]:
    """The modules ``path`` imports anywhere (in functions too): top-level packages, or ``whole`` dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name if whole else alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if whole else node.module.split(".")[0])
    return names


def test_only_the_protocol_package_imports_aiomqtt():
    """The transport seam: another broker is a new module in sled_protocol, not an edit to either service."""
    packages = ["sled_edge", "sled_verifier", "sled_models"]
    offenders = [str(path.relative_to(ROOT)) for package in packages for path in sorted((ROOT / package).rglob("*.py"))
                 if {"aiomqtt", "paho"} & imported_modules(path)]
    assert offenders == []
    assert "aiomqtt" in imported_modules(ROOT / "sled_protocol" / "mqtt.py")  # the check sees imports at all


def test_no_service_or_core_module_imports_the_mqtt_module():
    """The URL parser, the MQTT versions, the CA check and ``backoff_s`` live on the seam's side
    (``sled_protocol.transport``, ``.connection``): neither service nor the pure core reaches aiomqtt's module
    for them, not even in a function; ``transport_for`` alone loads it, by the URL's scheme."""
    paths = [path for package in ("sled_edge", "sled_verifier", "sled_models") for path in (ROOT / package).rglob("*.py")]
    paths += [ROOT / (module.replace(".", "/") + ".py") for module in PLAIN + SEAM if module.startswith("sled_protocol")]
    offenders = sorted(str(path.relative_to(ROOT)) for path in paths
                       if "sled_protocol.mqtt" in imported_modules(path, whole=True))
    assert offenders == []
    assert "sled_protocol.mqtt" in imported_modules(ROOT / "sled_protocol" / "inspect.py", whole=True)  # it sees them
