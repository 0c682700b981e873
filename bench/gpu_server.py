"""The server side of the bench on an accelerator: model ceiling, server-only decoding and the verifier
engine verifying simulated drafts, in one process (no broker, no devices: the server's own costs), for
each runtime (``--runtimes transformers,compiled``). For the compiled runtime on a GPU it also captures the
same shapes' static forward as one CUDA graph and times its replay: the limit a step can approach (no
Python, no launches). And it decodes the smallest N's sessions alone to count how often the batched
verification's output differs from the target decoding alone (bf16 on a GPU is where it can).

Weights do not change timings, so the targets are random-initialised from their shapes: the family's
quick target (12M) and a Qwen2.5-0.5B-shaped Llama. Drafts are the target's own continuation with each
token replaced by a random one with probability 1 - alpha (acceptance alpha per position).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sled_models.timing import timed  # noqa: E402

SHAPES = {
    "quick-target-12M": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                             num_attention_heads=6, num_key_value_heads=6),
    "qwen2.5-0.5B-shaped": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-7B-shaped": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4),
}


def build(shape: dict, directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=0,
                         bos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ceiling(target, n: int, k: int, context: int) -> dict:
    kv = target.init_kv(max_slots=n, max_length=context + k + 8)
    slots = [kv.acquire() for _ in range(n)]
    target.forward_rows(slots, [0] * n, [[random.randrange(1, 4000) for _ in range(context)] for _ in range(n)])
    wide = timed(lambda: target.forward_rows(slots, [context] * n, [[1] * (k + 1)] * n), repeat=10, sync=sync)
    one = timed(lambda: target.forward_rows(slots, [context] * n, [[1]] * n), repeat=10, sync=sync)
    separate = timed(lambda: [target.forward_rows([s], [context], [[1] * (k + 1)]) for s in slots], repeat=3, sync=sync)
    return {"forward_ms_n_x_k1": round(1000 * wide, 3), "forward_ms_n_x_1": round(1000 * one, 3),
            "forward_ms_n_separate": round(1000 * separate, 3), "pass_cost_ratio": round(wide / one, 3),
            "batching_gain_raw": round(separate / wide, 2)}


def graph_replay(target, n: int, k: int, context: int) -> float | None:
    """ms of one N x (k+1) static forward captured as a CUDA graph and replayed: the step's limit."""
    if target.name != "compiled" or target.device.type != "cuda":
        return None
    from sled_verifier.compiled import CompiledTarget

    kv = target.init_kv(max_slots=n, max_length=context + k + 8)
    slots = [kv.acquire() for _ in range(n)]
    target.forward_rows(slots, [0] * n, [[random.randrange(1, 4000) for _ in range(context)] for _ in range(n)])
    static, target.static = target.static, True
    try:
        arguments, _, _ = target.prepare(slots, [context] * n, [[1] * (k + 1)] * n)
        with torch.inference_mode():
            def run():
                return CompiledTarget._forward_static(target, *arguments)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            return round(1000 * timed(graph.replay, repeat=10, sync=sync), 3)
    finally:
        target.static = static


def alone_differences(target, prompts, continuations, tokens: int) -> dict:
    """Decode each session alone (batch of one) and count tokens where the batched decode differs."""
    differing, first_flip = 0, None
    for row, prompt in enumerate(prompts):
        alone = _decode_alone(target, prompt, tokens)
        flips = [i for i, (a, b) in enumerate(zip(alone, continuations[row][:tokens])) if a != b]
        if flips:
            differing += 1
            first_flip = first_flip if first_flip is not None else flips[0]
    return {"sessions": len(prompts), "sessions_differing": differing, "first_flip_at": first_flip}


def _decode_alone(target, prompt: list[int], tokens: int) -> list[int]:
    kv = target.init_kv(max_slots=1, max_length=len(prompt) + tokens + 8)
    slot = kv.acquire()
    logits = target.forward_rows([slot], [0], [prompt])
    out = [int(logits[0, len(prompt) - 1].argmax())]
    while len(out) < tokens:
        logits = target.forward_rows([slot], [len(prompt) + len(out) - 1], [[out[-1]]])
        out.append(int(logits[0, 0].argmax()))
    return out


def server_only(target, prompts: list[list[int]], tokens: int) -> tuple[dict, list[list[int]]]:
    kv = target.init_kv(max_slots=len(prompts), max_length=max(map(len, prompts)) + 2 * tokens + 16)
    slots = [kv.acquire() for _ in prompts]
    sync()
    started = time.perf_counter()
    logits = target.forward_rows(slots, [0] * len(prompts), prompts)
    outputs = [[t] for t in logits[:, len(prompts[0]) - 1].argmax(-1).tolist()]
    lengths = [len(p) for p in prompts]
    for _ in range(2 * tokens - 1):  # twice as far: the drafts below need the continuation beyond `tokens`
        logits = target.forward_rows(slots, lengths, [[o[-1]] for o in outputs])
        for row, token in enumerate(logits[:, 0].argmax(-1).tolist()):
            outputs[row].append(token)
            lengths[row] += 1
        if len(outputs[0]) == tokens:
            sync()
            wall = time.perf_counter() - started
    return ({"system_tokens_per_s": round(len(prompts) * tokens / wall, 1),
             "model_s_per_token": round(wall / (len(prompts) * tokens), 7)}, outputs)


def sled_engine(target, prompts, continuations, tokens: int, k: int, alpha: float) -> dict:
    from sled_edge.session import EdgeSession
    from sled_verifier.engine import Quotas, VerifierEngine
    from sled_verifier.stats import VerifierStats

    rng = random.Random(1)
    engine = VerifierEngine(target, "gpu", max_sessions=len(prompts) + 1, stats=VerifierStats(),
                            quotas=Quotas(device_max_sessions=len(prompts) + 1),  # one emulated device holds all
                            max_context=len(prompts[0]) + 2 * tokens + 16)
    sessions = [EdgeSession(f"s{i}", "d", "v", list(p), len(p) + tokens) for i, p in enumerate(prompts)]
    # Open and prefill every session in a first round (timed below only from the second round on).
    opening = [s.draft([]) for s in sessions]
    for s, d, o in zip(sessions, opening, engine.step_until_answered(opening)):
        s.apply(d, o.verdict)
    sync()
    started = time.perf_counter()
    forward_before = engine.stats.forward_s
    steps = 0
    while any(s.finish is None for s in sessions):
        live = [s for s in sessions if s.finish is None]
        drafts = []
        for s in live:
            s.send_context = False
            done = len(s.committed) - len(prompts[int(s.session_id[1:])])
            truth = continuations[int(s.session_id[1:])][done : done + min(k, s.budget - 1)]
            drafts.append(s.draft([t if rng.random() < alpha else rng.randrange(1, 4000) for t in truth]))
        for s, d, o in zip(live, drafts, engine.step_until_answered(drafts)):
            s.apply(d, o.verdict)
        steps += 1
    sync()
    wall = time.perf_counter() - started
    committed = sum(len(s.committed) - len(p) for s, p in zip(sessions, prompts))
    exact = all(s.committed[len(p):] == c[: len(s.committed) - len(p)] for s, p, c in zip(sessions, prompts, continuations))
    forward = engine.stats.forward_s - forward_before
    return {"system_tokens_per_s": round(committed / wall, 1), "model_s_per_token": round(forward / committed, 7),
            "overhead": round(1 - forward / wall, 3), "steps": steps, "exact": exact,
            "mean_accepted_length": round(committed / max(1, sum(s.stats.rounds for s in sessions)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ns", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runtimes", default="transformers,compiled")
    parser.add_argument("--shapes", default="quick-target-12M,qwen2.5-0.5B-shaped", help=f"of {', '.join(SHAPES)}")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    from sled_verifier.runtime import load_target

    ns = [int(n) for n in args.ns.split(",")]
    report = {"hardware": hardware, "dtype": args.dtype, "k": args.k, "alpha": args.alpha, "tokens": args.tokens, "shapes": {}}
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as directory:
            build(SHAPES[name], Path(directory))
            targets = {runtime: load_target(directory, runtime, device=device, dtype=args.dtype)
                       for runtime in args.runtimes.split(",")}
        for runtime, target in targets.items():
            rows = {}
            for n in ns:
                rng = random.Random(n)
                prompts = [[rng.randrange(1, 4000) for _ in range(128)] for _ in range(n)]
                base, continuations = server_only(target, prompts, args.tokens)
                sled = sled_engine(target, prompts, continuations, args.tokens, args.k, args.alpha)
                context = 128 + args.tokens // 2
                rows[n] = {"ceiling": ceiling(target, n, args.k, context), "server_only": base, "sled_engine": sled,
                           "graph_replay_ms_n_x_k1": graph_replay(target, n, args.k, context),
                           "server_cost_ratio": round(base["model_s_per_token"] / sled["model_s_per_token"], 2)}
                if n == ns[0]:
                    rows[n]["batched_vs_alone"] = alone_differences(target, prompts, continuations, args.tokens)
                print(f"{hardware} {name} {runtime} N={n}: {json.dumps(rows[n])}", flush=True)
            report["shapes"][f"{name}/{runtime}"] = rows
            del target
        targets.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-server-{device}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
