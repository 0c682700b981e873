"""Small rooms (issue 14): every module of the verifier, the edge, the protocol and the model tools under 400
lines, every function under 80. (bench/ is exempt: scripts, not a house.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ["sled_verifier", "sled_edge", "sled_protocol", "sled_models"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(directory: Path) -> list[str]:
    found = []
    for path in sorted(directory.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines >= MAX_MODULE_LINES:
            found.append(f"{path.name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length >= MAX_FUNCTION_LINES:
                    found.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_are_small(package):
    assert oversized(ROOT / package) == []


def test_the_check_sees_a_long_function_and_a_long_module(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 85 + "\n" * 320)
    assert oversized(tmp_path) == ["long.py: 406 lines", "long.py:1 f: 86 lines"]
