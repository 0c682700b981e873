"""``make models``: build the model family offline and reproducibly, stage by stage, with progress.

Stages (each cached under a key hashed from its part of the recipe and its inputs' keys, so a
change rebuilds only what depends on it): corpus -> tokenizer + token arrays -> target -> drafts
distilled (KL on the corpus) -> on-policy (KL on the target's continuations) -> ONNX fp32 + int8 ->
evaluation. The manifest records file hashes, parameter counts, vocabulary and corpus hashes, the
recipe, timings and the evaluation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from sled_models.corpus import read_texts, stdlib_corpus
from sled_models.recipe import Recipe, stage_key

EOS = "<|endoftext|>"


class Stages:
    """Stage keys on disk; a stage whose key and outputs are present is skipped."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.keys: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, key: str, outputs: list[Path], build) -> bool:
        if self.keys.get(name) == key and all(p.exists() for p in outputs):
            print(f"[{name}] up to date ({key})", file=sys.stderr)
            return False
        started = time.monotonic()
        print(f"[{name}] building ({key})", file=sys.stderr)
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
        build()
        self.seconds[name] = round(time.monotonic() - started, 1)
        self.keys[name] = key
        self.path.write_text(json.dumps(self.keys, indent=2))
        print(f"[{name}] done in {self.seconds[name]} s", file=sys.stderr)
        return True


def bar(stage: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def build_family(out: Path, recipe: Recipe, threads: int | None = None) -> dict:
    """Build (or bring up to date) the family in ``out``: each stage below runs only when its key changed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    started = time.monotonic()
    corpus = stdlib_corpus(max_files=recipe.max_files)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.held_out)} held-out files from {corpus.root}, "
          f"{corpus.train_bytes / 1e6:.1f} MB, sha256 {corpus.sha256}", file=sys.stderr)

    # 1. Tokenizer and token arrays.
    tok_key = stage_key(corpus.sha256, recipe.vocab_size, recipe.version)
    stages.run("tokenizer", tok_key, [out / "tokenizer", out / "tokens_train.npy", out / "tokens_held_out.npy"],
               partial(build_tokenizer, out, recipe, corpus))
    train_tokens = np.load(out / "tokens_train.npy")
    held_out = np.load(out / "tokens_held_out.npy")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos_id = tokenizer.eos_token_id

    # 2. The target.
    target_key = stage_key(tok_key, recipe.target_arch, recipe.target_train)
    stages.run("target", target_key, [out / "target"], partial(build_target, out, recipe, tokenizer, train_tokens))
    target = AutoModelForCausalLM.from_pretrained(out / "target", local_files_only=True).eval()

    # 3. Distillation on the corpus, all drafts on the same batches (one teacher pass each).
    distill_key = stage_key(target_key, [(d.name, d.arch, d.distill) for d in recipe.drafts])
    stages.run("distill", distill_key, [out / "hf-distilled"],
               partial(build_distilled, out, recipe, target, tokenizer, train_tokens))

    # 4. On-policy: the target's own continuations (half greedy, half sampled), KL on the continuation.
    policy_key = stage_key(distill_key, [(d.name, d.on_policy) for d in recipe.drafts], recipe.on_policy_sequences,
                           recipe.continuation_tokens, recipe.prompt_tokens)
    stages.run("on-policy", policy_key, [out / "hf"], partial(build_on_policy, out, recipe, target, tokenizer, train_tokens))

    # 5. ONNX exports, fp32 and int8.
    stages.run("export", stage_key(policy_key, "onnx-v1"), [out / "drafts"], partial(build_exports, out, recipe))

    # 6. Evaluation.
    eval_key = stage_key(policy_key, recipe.eval_prompts, recipe.eval_tokens, "eval-v1")
    stages.run("eval", eval_key, [out / "eval.json"], partial(build_evaluation, out, recipe, held_out))

    manifest = write_manifest(out, recipe, corpus, target, eos_id, stages, time.monotonic() - started)
    print_evaluation(json.loads((out / "eval.json").read_text()))
    return manifest


def build_tokenizer(out: Path, recipe: Recipe, corpus) -> None:
    """A byte-level BPE tokenizer trained on the corpus, and the corpus as token arrays (EOS after each file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train_texts = read_texts(corpus.train)
    tokenizer.train_from_iterator(train_texts, trainer=trainer)
    # model_input_names: without it GPT-2 style models silently receive token_type_ids.
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(out / "tokenizer")
    eos_id = tokenizer.token_to_id(EOS)
    for split, paths in (("train", corpus.train), ("held_out", corpus.held_out)):
        ids = [e.ids + [eos_id] for e in tokenizer.encode_batch(read_texts(paths))]
        np.save(out / f"tokens_{split}.npy", np.concatenate(ids).astype(np.uint16))


def build_target(out: Path, recipe: Recipe, tokenizer, train_tokens: np.ndarray) -> None:
    from sled_models.train import make_model, pretrain

    model = make_model(recipe.target_arch, len(tokenizer), tokenizer.eos_token_id, recipe.target_train.seed)
    with bar("target", recipe.target_train.steps) as progress:
        pretrain(model, train_tokens, recipe.target_train,
                 lambda step, logs: (progress.update(1), progress.set_postfix(logs)))
    model.save_pretrained(out / "target")
    tokenizer.save_pretrained(out / "target")


def _show(progress):
    """A training callback that advances ``progress`` and shows the step's losses."""
    return lambda step, logs: (progress.update(1), progress.set_postfix({k: round(v, 3) for k, v in logs.items()}))


def build_distilled(out: Path, recipe: Recipe, target, tokenizer, train_tokens: np.ndarray) -> None:
    from sled_models.train import distill, make_model, random_batches

    students = [make_model(d.arch, len(tokenizer), tokenizer.eos_token_id, d.distill.seed) for d in recipe.drafts]
    schedules = [d.distill for d in recipe.drafts]
    first = schedules[0]
    with bar("distill", max(s.steps for s in schedules)) as progress:
        distill(target, students, schedules, random_batches(train_tokens, first.batch, first.seq_len, first.seed),
                _show(progress))
    for draft, student in zip(recipe.drafts, students):
        student.save_pretrained(out / "hf-distilled" / draft.name)


def target_continuations(recipe: Recipe, target, eos_id: int, train_tokens: np.ndarray):
    """``on_policy_sequences`` prompts from the corpus, each continued by the target, alternating greedy and
    sampled chunks of 32: [S, P + C]."""
    import torch

    from sled_models.evaluate import _windows
    from sled_models.train import continuations

    prompts = torch.tensor(_windows(train_tokens, recipe.on_policy_sequences, recipe.prompt_tokens, seed=7))
    chunks = []
    with bar("continuations", len(prompts)) as progress:
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            chunks.append(continuations(target, chunk, recipe.continuation_tokens, sample=(start // 32) % 2 == 1,
                                        seed=start, pad_id=eos_id))
            progress.update(len(chunk))
    return torch.cat(chunks)


def build_on_policy(out: Path, recipe: Recipe, target, tokenizer, train_tokens: np.ndarray) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sled_models.train import distill

    pool = target_continuations(recipe, target, tokenizer.eos_token_id, train_tokens)   # [S, P + C]
    students = [AutoModelForCausalLM.from_pretrained(out / "hf-distilled" / d.name) for d in recipe.drafts]
    schedules = [d.on_policy for d in recipe.drafts]
    generator = np.random.default_rng(schedules[0].seed)

    def batches():
        while True:
            yield pool[generator.integers(0, len(pool), size=schedules[0].batch)]

    def continuation_mask(x):
        mask = torch.zeros(x.shape, dtype=torch.float32)
        mask[:, recipe.prompt_tokens - 1 :] = 1.0
        return mask

    with bar("on-policy", max(s.steps for s in schedules)) as progress:
        distill(target, students, schedules, batches(), _show(progress), mask_fn=continuation_mask)
    for draft, student in zip(recipe.drafts, students):
        student.save_pretrained(out / "hf" / draft.name)
        tokenizer.save_pretrained(out / "hf" / draft.name)


def build_exports(out: Path, recipe: Recipe) -> None:
    from sled_models.export import export_draft

    for draft in recipe.drafts:
        print(f"  export {draft.name} (fp32, int8)", file=sys.stderr)
        export_draft(out / "hf" / draft.name, out / "drafts" / draft.name)
        export_draft(out / "hf" / draft.name, out / "drafts" / f"{draft.name}-int8", int8=True)


def build_evaluation(out: Path, recipe: Recipe, held_out: np.ndarray) -> None:
    from sled_models.evaluate import evaluate_family

    eval_paths = {f"{d.name}{suffix}": out / "drafts" / f"{d.name}{suffix}" for d in recipe.drafts for suffix in ("", "-int8")}
    results = evaluate_family(out, held_out, eval_paths, recipe.prompt_tokens, recipe.eval_prompts, recipe.eval_tokens,
                              progress=lambda message: print(f"  {message}", file=sys.stderr))
    (out / "eval.json").write_text(json.dumps(results, indent=2))


def write_manifest(out: Path, recipe: Recipe, corpus, target, eos_id: int, stages: Stages, seconds: float) -> dict:
    from transformers import AutoModelForCausalLM

    from sled_models.train import parameter_count
    from sled_protocol.vocab import vocab_hash

    drafts = {}
    for draft in recipe.drafts:
        model = AutoModelForCausalLM.from_pretrained(out / "hf" / draft.name)
        drafts[draft.name] = {
            "mimics": draft.mimics, "kind": f"{draft.arch.arch} {draft.arch.layers}x{draft.arch.hidden}",
            "parameters": parameter_count(model), "path": f"drafts/{draft.name}",
            "path_int8": f"drafts/{draft.name}-int8", "hf_path": f"hf/{draft.name}",
        }
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
             for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".onnx", ".safetensors", ".json")
             and p.name not in ("manifest.json", "stages.json") and not p.relative_to(out).parts[0].startswith("hf-")}
    manifest = {
        "recipe_version": recipe.version, "profile": recipe.profile, "recipe": asdict(recipe),
        "corpus": {"root": str(corpus.root), "sha256": corpus.sha256, "train_files": len(corpus.train),
                   "held_out_files": len(corpus.held_out)},
        "vocab_hash": vocab_hash(out / "target"), "vocab_size": target.config.vocab_size, "eos_id": eos_id,
        "target": "target", "target_parameters": parameter_count(target),
        "drafts": drafts, "stage_keys": stages.keys, "stage_seconds_this_run": stages.seconds,
        "build_seconds_this_run": round(seconds, 1), "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def print_evaluation(results: dict) -> None:
    print("\ndraft              alpha_cont  alpha_text  acc_len@2  acc_len@4  acc_len@6  draft_ms/tok", file=sys.stderr)
    for name, r in results.items():
        if name == "target":
            continue
        print(f"{name:<18} {r['alpha_continuations']:>10.3f}  {r['alpha_text']:>10.3f}  "
              f"{r['mean_accepted_length_k2']:>9.2f}  {r['mean_accepted_length_k4']:>9.2f}  "
              f"{r['mean_accepted_length_k6']:>9.2f}  {r['draft_ms_per_token']:>12.2f}", file=sys.stderr)
    target = results["target"]
    print(f"target verification pass (5 tokens/session): batch 1 {target['verify_ms_batch1']} ms, "
          f"batch 8 {target['verify_ms_batch8']} ms", file=sys.stderr)
