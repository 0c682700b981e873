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
