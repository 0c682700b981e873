"""Tiny random-weight model families built offline, for tests and the first demo.

No weights are ever downloaded: a byte-level BPE tokenizer is trained on a small text that ships with
every Python (this module's own standard library), and target and drafts are random-initialised
Hugging Face causal LMs sharing it. ``initializer_range`` is deliberately large so that greedy argmaxes
are separated by wide margins: lossless tests then compare exact token ids without floating-point ties.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TinySpec", "build_tokenizer", "build_model", "build_perturbed", "export_onnx", "TARGET_LLAMA", "DRAFT_GPT2"]

SPECIAL_TOKENS = ["<|endoftext|>"]


@dataclass(frozen=True)
class TinySpec:
    """Architecture of one tiny model; ``arch`` is ``llama`` or ``gpt2``."""

    arch: str
    layers: int
    hidden: int
    heads: int
    seed: int
    initializer_range: float = 0.6


TARGET_LLAMA = TinySpec(arch="llama", layers=2, hidden=64, heads=4, seed=1)
DRAFT_GPT2 = TinySpec(arch="gpt2", layers=1, hidden=32, heads=2, seed=2)


def _corpus_lines(max_bytes: int) -> list[str]:
    import asyncio
    import json as json_module

    lines: list[str] = []
    total = 0
    for module in (asyncio, json_module):
        for path in sorted(Path(module.__file__).parent.glob("*.py")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                lines.append(line)
                total += len(line)
                if total >= max_bytes:
                    return lines
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(400_000), trainer=trainer)
    # model_input_names: without it GPT-2 style models silently receive token_type_ids.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[0],
        model_input_names=["input_ids", "attention_mask"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(spec: TinySpec, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Random-initialise ``spec`` with a fixed seed and save model + tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=1024, initializer_range=spec.initializer_range,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    elif spec.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
            n_positions=1024, initializer_range=spec.initializer_range,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown architecture {spec.arch!r} (expected llama or gpt2)")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sled_tiny_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    return out_dir


def export_onnx(hf_dir: Path, out_dir: Path) -> Path:
    """Export a Hugging Face causal LM to ONNX with past key values (optimum), tokenizer alongside."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir), output=str(out_dir), task="text-generation-with-past",
        local_files_only=True, do_validation=False,
    )
    return out_dir


def build_perturbed(source_dir: Path, out_dir: Path, noise: float, seed: int) -> Path:
    """A copy of ``source_dir`` with every weight jittered by ``noise`` x its tensor's std (a partial-agreement draft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_dir, local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs().mean()
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * noise)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    return out_dir


# The demo family until the trained family exists: one target, three drafts of different size/agreement.
# name: (how it is made, weight noise relative to each tensor's std)
TINY_DRAFTS = {
    "jetson-orin": ("perturbed", 0.01),  # close copy of the target: ~85% greedy agreement
    "rpi5": ("perturbed", 0.03),         # looser copy: ~65%
    "rpi4": ("gpt2", None),              # a different, 8x smaller architecture: almost never agrees
}
TINY_RECIPE_VERSION = 1


def build_tiny_family(out: Path, log=print) -> dict:
    """Build tokenizer, Llama target and the ``TINY_DRAFTS`` with ONNX exports; reuse a finished build."""
    import hashlib
    import time
    import warnings

    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("recipe_version") == TINY_RECIPE_VERSION:
            log(f"models: reusing {out} (recipe v{TINY_RECIPE_VERSION})")
            return manifest
    started = time.monotonic()
    steps = 3 + len(TINY_DRAFTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        log(f"models [1/{steps}] tokenizer (byte-level BPE on the standard library)")
        build_tokenizer(out / "tokenizer")
        log(f"models [2/{steps}] target {TARGET_LLAMA}")
        build_model(TARGET_LLAMA, out / "tokenizer", out / "target")
        drafts = {}
        for index, (name, (kind, noise)) in enumerate(TINY_DRAFTS.items(), start=3):
            log(f"models [{index}/{steps}] draft {name} ({kind}{f', noise {noise}' if noise else ''}) + ONNX export")
            hf_dir = out / "hf" / name
            if kind == "perturbed":
                build_perturbed(out / "target", hf_dir, noise, seed=index)
            else:
                build_model(DRAFT_GPT2, out / "tokenizer", hf_dir)
            export_onnx(hf_dir, out / "drafts" / name)
            drafts[name] = {"path": f"drafts/{name}", "kind": kind, "noise": noise}
    manifest = {
        "recipe_version": TINY_RECIPE_VERSION,
        "target": "target",
        "drafts": drafts,
        "files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                  for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".onnx", ".safetensors", ".json")},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    log(f"models [{steps}/{steps}] done in {time.monotonic() - started:.1f} s: {out}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sled_models.tiny",
                                     description="Build the tiny random-weight demo family (target + 3 ONNX drafts).")
    parser.add_argument("--out", type=Path, default=Path("models/build/tiny"), help="output directory")
    build_tiny_family(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
