"""The model family's recipe: architectures, step-based schedules, seeds. Profiles: quick (default), full.

Everything the build does is decided here, and each stage's cache key is a hash of the parts of the
recipe it depends on, so changing one draft's schedule rebuilds that draft only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Arch:
    arch: str              # llama | gpt2
    layers: int
    hidden: int
    heads: int
    intermediate: int = 0  # llama MLP width (SwiGLU)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    seq_len: int
    peak_lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class DraftRecipe:
    name: str
    mimics: str            # the device class it stands for
    arch: Arch
    distill: Schedule      # soft distillation on the corpus: KL to the target's logits
    on_policy: Schedule    # the same on the target's own continuations (greedy and sampled)


@dataclass(frozen=True)
class Recipe:
    profile: str
    vocab_size: int
    target_arch: Arch
    target_train: Schedule
    drafts: tuple[DraftRecipe, ...]
    on_policy_sequences: int = 256    # target continuations generated for on-policy training
    continuation_tokens: int = 128
    prompt_tokens: int = 64
    eval_prompts: int = 24
    eval_tokens: int = 96
    max_files: int = 0                # 0: the whole corpus; > 0 only for smoke builds
    version: int = field(default=RECIPE_VERSION)


def get_lr(step: int, schedule: Schedule) -> float:
    """Linear warm-up to ``peak_lr``, then cosine decay to ``min_lr_ratio * peak_lr`` at the last step."""
    if step < schedule.warmup_steps:
        return schedule.peak_lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return schedule.peak_lr * (schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine)


def stage_key(*parts: object) -> str:
    """A short hash of the recipe parts (and upstream keys) a stage depends on."""
    blob = json.dumps(list(parts), sort_keys=True, default=asdict)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TARGET = Arch("llama", layers=6, hidden=384, heads=6, intermediate=1024)
DRAFT_ARCHS = {
    "jetson-orin": ("Jetson Orin Nano", Arch("llama", layers=3, hidden=256, heads=4, intermediate=640)),
    "rpi5": ("Raspberry Pi 5", Arch("gpt2", layers=2, hidden=192, heads=4)),
    "rpi4": ("Raspberry Pi 4", Arch("llama", layers=1, hidden=128, heads=2, intermediate=320)),
}


def _drafts(distill_steps: int, on_policy_steps: int) -> tuple[DraftRecipe, ...]:
    return tuple(
        DraftRecipe(name, mimics, arch,
                    distill=Schedule(distill_steps, 16, 128, 3e-3, 10, seed=10 + i),
                    on_policy=Schedule(on_policy_steps, 16, 192, 1e-3, 5, seed=20 + i))
        for i, (name, (mimics, arch)) in enumerate(DRAFT_ARCHS.items())
    )


PROFILES = {
    # ~10 minutes on 2 CPU cores (measured: 10 min 10 s from scratch).
    "quick": Recipe("quick", 4096, TARGET, Schedule(200, 16, 256, 2e-3, 20, seed=1), _drafts(150, 90)),
    # Opt-in: a better target and drafts (roughly an hour on 2 cores).
    # Seconds: every stage once, for tests of the build itself; the models are untrained.
    "smoke": Recipe("smoke", 512, Arch("llama", 1, 64, 2, 128), Schedule(3, 4, 64, 2e-3, 1, seed=1),
                    tuple(DraftRecipe(d.name, d.mimics, Arch(d.arch.arch, 1, 32, 2, 64), Schedule(2, 4, 64, 3e-3, 1),
                                      Schedule(2, 4, 64, 1e-3, 1)) for d in _drafts(2, 2)),
                    on_policy_sequences=8, continuation_tokens=16, prompt_tokens=16, eval_prompts=8, eval_tokens=48,
                    max_files=40),
    "full": Recipe("full", 4096, TARGET, Schedule(800, 16, 256, 2e-3, 40, seed=1), _drafts(300, 200),
                   on_policy_sequences=768),
}


@dataclass(frozen=True)
class DistilledDraft:
    """One device class's draft for any target: ``layers`` of the target's layers (the first half from its
    start, the rest from its end), with the target's embeddings, final norm and head, frozen; of the layers,
    the first ``frozen`` stay as they are (default: those from the start) and the others are trained."""

    name: str
    mimics: str
    layers: int
    frozen: int | None = None


@dataclass(frozen=True)
class QuantizedDraft:
    """One device class's draft as the whole target with its matrix weights quantized block-wise: every
    ``block_size`` weights along a product's input share one scale (and a zero point unless ``symmetric``),
    ``bits`` 4 or 8 (onnxruntime's MatMulNBits, int8 activations in the products). Nothing is trained, so it
    is built in seconds and agrees with the target as far as its weights do; it is the target's size in
    layers, so it suits a target small enough for the device (a 135M target on a Pi 5), where a trained
    ``DistilledDraft`` of a few layers would accept far less."""

    name: str
    mimics: str
    bits: int
    block_size: int = 32
    symmetric: bool = False


@dataclass(frozen=True)
class DistillRecipe:
    """``sled-models distill``: the target's greedy answers to ``train_prompts`` chat prompts (top-``top_k``
    logits and final hidden state at every position), the drafts trained on them, acceptance judged on
    ``eval_prompts`` held-out prompts at ``k``."""

    drafts: tuple[DistilledDraft | QuantizedDraft, ...]
    train: Schedule | None = None    # the trained drafts' schedule (None: the recipe has none)
    train_prompts: int = 256
    new_tokens: int = 64
    generate_batch: int = 32
    top_k: int = 32
    hidden_weight: float = 1.0       # the final-hidden-state MSE beside the top-k KL
    ce_weight: float = 0.0           # cross-entropy (full vocabulary) on the target's greedy token
    eval_prompts: int = 24
    eval_tokens: int = 96
    k: int = 4
    version: int = 1


DISTILL_RECIPES = {
    # The target itself, quantized: no training, built in about a minute; for a target a device can hold.
    "default": DistillRecipe(
        (QuantizedDraft("large", "Jetson Orin Nano", bits=8), QuantizedDraft("small", "Raspberry Pi 5", bits=4)),
        train_prompts=0, eval_prompts=16, eval_tokens=64),
    # A few of the target's layers, trained on its answers: for a target too large for the device
    # (about 20 CPU minutes for SmolLM2-135M).
    "trained": DistillRecipe(
        (DistilledDraft("large", "Jetson Orin Nano", 6, frozen=0), DistilledDraft("small", "Raspberry Pi 5", 3, frozen=0)),
        train=Schedule(steps=160, batch=8, seq_len=0, peak_lr=2e-3, warmup_steps=6, weight_decay=0.0, seed=3),
        train_prompts=256, new_tokens=96, eval_prompts=16, eval_tokens=64, hidden_weight=0.2, ce_weight=0.5),
    # Seconds, for tests on tiny targets: every stage once.
    "smoke": DistillRecipe(
        (DistilledDraft("large", "Jetson Orin Nano", 2, frozen=0), DistilledDraft("small", "Raspberry Pi 5", 1),
         QuantizedDraft("whole", "Raspberry Pi 4", bits=8)),
        train=Schedule(steps=6, batch=4, seq_len=0, peak_lr=1e-3, warmup_steps=1, weight_decay=0.0, seed=3),
        train_prompts=16, new_tokens=12, generate_batch=8, top_k=8, eval_prompts=6, eval_tokens=16, ce_weight=0.5),
}
