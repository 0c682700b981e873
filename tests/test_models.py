"""The model family tooling: schedules, the simulated acceptance, a smoke build of every stage,
export of Hugging Face drafts of two architectures (fp32 and int8), and the vocabulary check."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from sled_models.evaluate import mean_acceptance_length
from sled_models.recipe import PROFILES, Schedule, get_lr


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    schedule = Schedule(steps=100, batch=1, seq_len=1, peak_lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [get_lr(step, schedule) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert get_lr(100, schedule) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("agree", "k", "expected"),
    [
        ([True] * 10, 4, 5.0),            # rounds commit 4 + bonus, twice
        ([False] * 6, 4, 1.0),            # every round commits only the recovered token
        ([True, True, False, True], 4, 2.0),  # round 1: 2 accepted + recovered (3), round 2: 1 token
        ([True] * 7, 2, 7 / 3),           # 3, 3, then 1
    ],
)
def test_mean_acceptance_length_simulation(agree, k, expected):
    assert mean_acceptance_length(np.array(agree), k) == pytest.approx(expected)


def run(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sled_models", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


@pytest.mark.slow  # about 10 s or more on a 2-core machine
def test_smoke_build_every_stage_then_reuse(tmp_path):
    out = tmp_path / "family"
    first = run("build", "--profile", "smoke", "--out", str(out), "--threads", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    recipe = PROFILES["smoke"]
    assert set(manifest["drafts"]) == {d.name for d in recipe.drafts}
    assert manifest["corpus"]["sha256"] and manifest["vocab_hash"] and manifest["target_parameters"] > 0
    for draft in manifest["drafts"].values():
        assert (out / draft["path"] / "model.onnx").is_file() and (out / draft["path_int8"] / "model.onnx").is_file()
        assert draft["parameters"] > 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert {"alpha_continuations", "alpha_text", "mean_accepted_length_k4", "draft_ms_per_token"} <= set(evaluation["rpi5"])
    assert {"verify_ms_batch1", "verify_ms_batch8"} <= set(evaluation["target"])
    again = run("build", "--profile", "smoke", "--out", str(out), "--threads", "1")
    assert again.returncode == 0 and again.stderr.count("up to date") == 6, again.stderr[-2000:]


@pytest.mark.parametrize("arch", ["target", "gpt2"])
def test_export_any_hf_draft_fp32_and_int8(tiny_models, tmp_path, arch):
    from sled_edge.draft_model import OnnxDraftModel
    from sled_edge.drafter import Drafter

    hf_dir = getattr(tiny_models, arch)
    for int8 in (False, True):
        out = tmp_path / f"{arch}-{'int8' if int8 else 'fp32'}"
        done = run("export-draft", "--hf-dir", str(hf_dir), "--out", str(out), "--target", str(tiny_models.target),
                   *(["--int8"] if int8 else []))
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["int8"] is int8
        tokens = Drafter(OnnxDraftModel(out)).propose([5, 6, 7, 8], 4).tokens
        assert len(tokens) == 4
    fp32_size = (tmp_path / f"{arch}-fp32" / "model.onnx").stat().st_size
    assert (tmp_path / f"{arch}-int8" / "model.onnx").stat().st_size < fp32_size


def test_export_fp16_for_gpu_providers(tiny_models, tmp_path):
    """float16 inputs, cache and logits; on the tiny target it drafts what the fp32 export drafts."""
    from sled_edge.draft_model import OnnxDraftModel
    from sled_edge.drafter import Drafter

    done = run("export-draft", "--hf-dir", str(tiny_models.target), "--out", str(tmp_path / "fp16"), "--fp16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["fp16"] is True
    fp16 = OnnxDraftModel(tmp_path / "fp16")
    assert fp16.cache_dtype == np.float16 and fp16.feed(fp16.new_cache(), [5, 6]).dtype == np.float16
    prompt = [5, 17, 99, 3]
    fp32 = OnnxDraftModel(tiny_models.target_onnx)
    assert Drafter(fp16).propose(prompt, 8).tokens == Drafter(fp32).propose(prompt, 8).tokens
    both = run("export-draft", "--hf-dir", str(tiny_models.target), "--out", str(tmp_path / "x"), "--fp16", "--int8")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_vocabulary_check_refuses_a_foreign_tokenizer(tiny_models, tmp_path):
    from sled_models.tiny import build_tokenizer

    build_tokenizer(tmp_path / "other", vocab_size=300)
    same = run("check", "--draft", str(tiny_models.gpt2_onnx), "--target", str(tiny_models.target))
    assert same.returncode == 0 and json.loads(same.stdout)["match"] is True
    other = run("check", "--draft", str(tmp_path / "other"), "--target", str(tiny_models.target))
    assert other.returncode == 65 and "vocabularies differ" in other.stderr
    refused = run("export-draft", "--hf-dir", str(tiny_models.gpt2), "--out", str(tmp_path / "x"),
                  "--target", str(tmp_path / "other"))
    assert refused.returncode == 65 and not (tmp_path / "x").exists()


def test_onnx_draft_matches_torch_greedy(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from sled_edge.draft_model import OnnxDraftModel
    from sled_edge.drafter import Drafter

    torch_model = AutoModelForCausalLM.from_pretrained(tiny_models.gpt2).eval()
    prompt = [5, 17, 99, 3]
    with torch.inference_mode():
        expected = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                                        max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert Drafter(OnnxDraftModel(tiny_models.gpt2_onnx)).propose(prompt, 6).tokens == expected[0, 4:].tolist()
