"""Choosing the onnxruntime execution provider: short and full names, auto, and a refusal that lists
what this onnxruntime build has (exit 78, bad configuration, from ``sled-edge``)."""

from __future__ import annotations

import os
import subprocess
import sys

import onnxruntime
import pytest

from conftest import ROOT
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.providers import ProviderUnavailable, available_providers, resolve_provider

JETSON = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
MAC = ["CoreMLExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", JETSON, "CUDAExecutionProvider"),      # not TensorRT: it rebuilds engines as the context grows
        ("auto", MAC, "CPUExecutionProvider"),          # CoreML only when asked for
        ("auto", ["CPUExecutionProvider"], "CPUExecutionProvider"),
        ("tensorrt", JETSON, "TensorrtExecutionProvider"),
        ("CUDA", JETSON, "CUDAExecutionProvider"),
        ("coreml", MAC, "CoreMLExecutionProvider"),
        ("CPUExecutionProvider", MAC, "CPUExecutionProvider"),
    ],
)
def test_resolve(choice, available, expected):
    assert resolve_provider(choice, available) == expected


def test_an_unavailable_provider_names_the_available_ones():
    with pytest.raises(ProviderUnavailable, match=r"'openvino' is not available.*available: cpu \(CPUExecutionProvider\)"):
        resolve_provider("openvino", ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailable, match="tensorrt"):
        resolve_provider("NoSuchExecutionProvider", JETSON)


def test_this_build_is_reported_without_remote_providers():
    assert "CPUExecutionProvider" in available_providers()
    assert set(available_providers()) <= set(onnxruntime.get_available_providers()) - {"AzureExecutionProvider"}


def test_the_draft_runs_on_the_chosen_provider(tiny_models):
    model = OnnxDraftModel(tiny_models.gpt2_onnx, provider="cpu")
    assert model.provider == "CPUExecutionProvider" and model.session.get_providers()[0] == model.provider
    with pytest.raises(ProviderUnavailable):
        OnnxDraftModel(tiny_models.gpt2_onnx, provider="no-such-accelerator")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_sled_edge_refuses_an_unavailable_provider_as_bad_config(tiny_models, how):
    args = [sys.executable, "-m", "sled_edge", "generate", "--draft", str(tiny_models.gpt2_onnx), "--prompt", "x",
            "--mqtt-url", "mqtt://127.0.0.1:1"]
    env = {**os.environ}
    if how == "flag":
        args += ["--provider", "no-such-accelerator"]
    else:
        env["SLED_PROVIDER"] = "no-such-accelerator"
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 78, done.stderr[-2000:]
    assert "no-such-accelerator" in done.stderr and "CPUExecutionProvider" in done.stderr
