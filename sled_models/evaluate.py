"""How good each draft is for its target: greedy agreement, exact simulated acceptance, speed.

- alpha_continuations: draft argmax == target token along the target's own greedy continuations of
  held-out prompts (a short-trained target loops, which inflates this one);
- alpha_text: draft argmax == target argmax along held-out text itself;
- mean accepted length at k (tokens committed per verification round), simulated exactly for greedy:
  while draft and target agree the draft sees the target's own prefix, so a round accepts the run of
  agreeing positions from its start, capped at k, then commits one more token;
- draft ms/token in onnxruntime, target ms per verification pass (k+1 = 5 tokens) at batch 1 and 8.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sled_models.timing import timed


def mean_acceptance_length(agree: np.ndarray, k: int) -> float:
    """Tokens per round for greedy speculative decoding along one sequence's agreement vector."""
    position = rounds = 0
    while position < len(agree):
        run = 0
        while run < k and position + run < len(agree) and agree[position + run]:
            run += 1
        position += run + 1
        rounds += 1
    return len(agree) / rounds if rounds else 0.0


def _windows(tokens: np.ndarray, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length - 1, size=count)
    return [tokens[s : s + length].astype(np.int64).tolist() for s in starts]


def evaluate_family(family: Path, held_out: np.ndarray, drafts: dict[str, Path], prompt_tokens: int,
                    eval_prompts: int, eval_tokens: int, progress=lambda message: None) -> dict:
    from transformers import AutoModelForCausalLM

    from sled_edge.draft_model import OnnxDraftModel
    from sled_verifier.target import TransformersTarget

    target = AutoModelForCausalLM.from_pretrained(family / "target", local_files_only=True).eval()
    prompts = torch.tensor(_windows(held_out, eval_prompts, prompt_tokens, seed=123))
    with torch.inference_mode():
        continued = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=eval_tokens,
                                    min_new_tokens=eval_tokens, do_sample=False, pad_token_id=target.config.pad_token_id)
        texts = torch.tensor(_windows(held_out, eval_prompts, prompt_tokens + eval_tokens, seed=456))
        text_argmax = target(input_ids=texts).logits.argmax(-1).numpy()                 # [N, T]
    results: dict[str, dict] = {}
    for name, path in drafts.items():
        progress(f"eval {name}")
        draft = OnnxDraftModel(path, threads=1)
        agree_cont, agree_text = [], []
        for row in range(len(prompts)):
            sequence = continued[row].tolist()
            logits = draft.logits_all(sequence[:-1])
            agree_cont.append(logits[prompt_tokens - 1 :].argmax(-1) == np.asarray(sequence[prompt_tokens:]))
            text = texts[row].tolist()
            agree_text.append(draft.logits_all(text).argmax(-1)[prompt_tokens:] == text_argmax[row, prompt_tokens:])
        cache_prompt = continued[0, :64].tolist()

        def draft_token(draft=draft, cache_prompt=cache_prompt) -> None:
            cache = draft.new_cache()
            draft.feed(cache, cache_prompt)
            for token in range(16):
                draft.feed(cache, [token])

        results[name] = {
            "alpha_continuations": round(float(np.mean(np.concatenate(agree_cont))), 4),
            "alpha_text": round(float(np.mean(np.concatenate(agree_text))), 4),
            **{f"mean_accepted_length_k{k}":  # the stored key; the figure is the mean acceptance length
               round(float(np.mean([mean_acceptance_length(a, k) for a in agree_cont])), 3) for k in (2, 4, 6)},
            "draft_ms_per_token": round(1000 * timed(draft_token, repeat=5) / 17, 3),
        }
    progress("eval target")
    verifier_target = TransformersTarget(family / "target", device="cpu")
    kv = verifier_target.init_kv(max_slots=8, max_length=continued.shape[1])
    slots = [kv.acquire() for _ in range(8)]
    contexts, inputs = continued[:8, :-5].tolist(), continued[:8, -5:].tolist()
    verifier_target.forward_rows(slots, [0] * 8, contexts)
    start = len(contexts[0])

    def verify(b: int) -> None:
        verifier_target.forward_rows(slots[:b], [start] * b, inputs[:b])

    results["target"] = {f"verify_ms_batch{b}": round(1000 * timed(lambda b=b: verify(b), repeat=10), 2)
                         for b in (1, 8)}
    return results


def draft_ms_per_token(path: Path, context: list[int], steps: int = 16) -> float:
    """Median ms of a one-token feed after ``context`` (onnxruntime, 1 thread, the device's cache)."""
    from sled_edge.draft_model import OnnxDraftModel

    model = OnnxDraftModel(path, threads=1)
    times = []
    for _ in range(3):
        cache = model.new_cache()
        model.feed(cache, context)
        for token in context[:steps]:
            started = time.perf_counter()
            model.feed(cache, [token])
            times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 3)


def target_ms_per_token(target, context: list[int], steps: int = 16) -> float:
    """Median ms of one decode step of the target after ``context`` (torch, 1 thread, its own KV cache)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            cache = target(input_ids=torch.tensor([context]), use_cache=True).past_key_values
            for token in context[:steps]:
                started = time.perf_counter()
                target(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return round(1000 * float(np.median(times)), 3)
