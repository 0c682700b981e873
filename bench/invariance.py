"""What exactness costs: the target's forward with plain kernels, batch invariant, and batch + width invariant.

``--cost`` times one runtime's forward on a real target (default: SmolLM2-135M-Instruct as ``make pretrained``
converts it) at the shapes that matter: a lone one-token row (server-only decoding), one 5-token
verification (k = 4), 16 and 64 of them, each after a 128-token context, and the prefill of a 512- and a
2048-token context in the engine's chunks (``prefill_chunk_tokens``, 64). Four variants on the same weights:

- ``plain``: the BLAS's own products, one masked SDPA per row (``--no-batch-invariant``);
- ``batch``: products padded to the probed row group (``sled_verifier.invariant``), one masked SDPA per row;
- ``loop``: batch invariant, and one one-query SDPA per query (the width invariance this replaced);
- ``blocks``: batch invariant and width invariant, the default (``sled_verifier.attention``: 8-query blocks,
  64-key spans, one SDPA per span of a row).

Every variant runs each shape in turn (interleaved, so a burst of other work on a shared machine hits them
alike), ``--rounds`` times; each figure is the median over rounds of the process's CPU seconds (and wall
seconds) for the shape, and each ratio the median of the per-round ratios to ``plain``. ``--probe`` runs the
load-time probe on the weight shapes of real models (random weights) at 1 and 2 threads and prints each
kernel's rule for each shape and the probe's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = {  # (in, out, bias) of every nn.Linear: q, k/v, o, gate/up, down, vocabulary head
    "family-12M": [(384, 384, False), (384, 1024, False), (1024, 384, False), (384, 4096, False)],
    "smollm2-135M": [(576, 576, False), (576, 192, False), (576, 1536, False), (1536, 576, False), (576, 49152, False)],
    "qwen2.5-0.5B": [(896, 896, True), (896, 128, True), (896, 896, False), (896, 4864, False), (4864, 896, False),
                     (896, 151936, False)],
    "llama-3.2-1B": [(2048, 2048, False), (2048, 512, False), (2048, 8192, False), (8192, 2048, False),
                     (2048, 128256, False)],
    "qwen2.5-7B": [(3584, 3584, True), (3584, 512, True), (3584, 3584, False), (3584, 18944, False),
                   (18944, 3584, False), (3584, 152064, False)],
}
STEPS = [("lone 1-token row", 1, 1), ("1 x 5", 1, 5), ("16 x 5", 16, 5), ("64 x 5", 64, 5)]
PREFILLS = [("prefill 512", 512), ("prefill 2048", 2048)]
VARIANTS = ("plain", "batch", "loop", "blocks")
CONTEXT = 128
CHUNK = 64  # the engine's prefill_chunk_tokens default


def smollm2_dir() -> Path:
    found = sorted((Path.home() / ".cache/sled/gguf-hf").glob("SmolLM2-135M-Instruct*"))
    return found[-1] if found else Path("smollm2-not-converted: run make pretrained")


def attend_per_query(query, key, value, rows, scaling):
    """The width invariance ``sled_verifier.attention`` replaced: each query its own one-query SDPA over
    exactly the keys before it (the rows planned without blocks)."""
    batch, heads, m_max, head_dim = query.shape
    out = query.new_zeros(batch, m_max, heads, head_dim)
    gqa = key.shape[1] != heads
    for row, (slot, width, m, _mask, _groups) in enumerate(rows):
        start = width - m
        for j in range(m):
            attended = F.scaled_dot_product_attention(
                query[row : row + 1, :, j : j + 1], key[slot : slot + 1, :, : start + j + 1],
                value[slot : slot + 1, :, : start + j + 1], scale=scaling, enable_gqa=gqa)
            out[row, j] = attended[0, :, 0]
    return out


class Variants:
    """Switches one loaded target between the four variants."""

    def __init__(self, target) -> None:
        import sled_verifier.compiled as compiled
        import sled_verifier.target as eager

        self.target, self.modules = target, (compiled, eager)
        self.attend = eager.attend_rows
        self.invariant = {m: vars(m)["forward"] for m in target.model.modules()
                          if type(m) is nn.Linear and "forward" in vars(m)}
        self.dense: dict = {}

    def use(self, variant: str) -> None:
        for module, forward in self.invariant.items():
            if variant == "plain":  # F.linear (MKL) over the plain weight; a reordered one (oneDNN) is densified once
                if module not in self.dense:
                    self.dense[module] = module.weight.to_dense() if module.weight.is_mkldnn else module.weight
                module.forward = lambda x, m=module: F.linear(x, self.dense[m], m.bias)
            else:
                module.forward = forward
        attend = attend_per_query if variant == "loop" else self.attend
        for runtime in self.modules:
            runtime.attend_rows = attend
        self.target.width_invariant = variant == "blocks"


def timed(run) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def step(target, kv, rows: int, tokens: int):
    inputs = [[(7 * r + t) % 1000 + 3 for t in range(tokens)] for r in range(rows)]

    def run():
        target.kv = kv
        target.forward_rows(list(range(rows)), [CONTEXT] * rows, inputs, logits=True)
    return run


def prefill(target, kv, length: int):
    tokens = [(11 * t) % 1000 + 3 for t in range(length)]

    def run():
        target.kv = kv
        for begin in range(0, length, CHUNK):
            target.forward_rows([0], [begin], [tokens[begin : begin + CHUNK]], logits=False)
    return run


def cost(model_dir: Path, runtime: str, rounds: int, repeat: int) -> None:
    from sled_verifier.runtime import load_target

    target = load_target(model_dir, runtime, "cpu")
    regime = target.batch_invariance
    steps_kv = target.init_kv(max_slots=64, max_length=CONTEXT + 16)
    for _ in range(64):
        steps_kv.acquire()
    prefill_kv = target.init_kv(max_slots=1, max_length=max(n for _, n in PREFILLS))
    prefill_kv.acquire()
    variants = Variants(target)
    variants.use("plain")  # the contexts' values do not matter to the timings: fill them quickly
    target.kv = steps_kv
    target.forward_rows(list(range(64)), [0] * 64, [[3 + r] * CONTEXT for r in range(64)], logits=False)
    shapes = [(label, step(target, steps_kv, rows, tokens), repeat) for label, rows, tokens in STEPS]
    shapes += [(label, prefill(target, prefill_kv, n), 1) for label, n in PREFILLS]
    cpu = {(label, v): [] for label, _, _ in shapes for v in VARIANTS}
    wall = {(label, v): [] for label, _, _ in shapes for v in VARIANTS}
    for variant in VARIANTS:  # warm-up: each step shape once (a prefill's first chunks warm it)
        variants.use(variant)
        for _, run, times in shapes:
            if times == repeat:
                run()
    for round_ in range(rounds):
        for label, run, times in shapes:
            for variant in VARIANTS:
                variants.use(variant)
                measured = [timed(run) for _ in range(times)]
                cpu[label, variant].append(statistics.median(c for c, _ in measured))
                wall[label, variant].append(statistics.median(w for _, w in measured))
        print(f"round {round_ + 1} of {rounds} done", file=sys.stderr, flush=True)
    print(f"{model_dir.name}, {runtime} runtime, {torch.get_num_threads()} thread(s), {regime}; steps after a "
          f"{CONTEXT}-token context (median of {repeat} per round), prefill in {CHUNK}-token chunks; median over "
          f"{rounds} interleaved rounds: CPU ms (wall ms), and the median per-round CPU ratio to plain")
    print(f"{'shape':<18}" + "".join(f"{v:>22}" for v in VARIANTS))
    for label, _, _ in shapes:
        cells = []
        for v in VARIANTS:
            ratio = statistics.median(c / p for c, p in zip(cpu[label, v], cpu[label, "plain"]))
            cpu_ms, wall_ms = 1000 * statistics.median(cpu[label, v]), 1000 * statistics.median(wall[label, v])
            cells.append(f"{cpu_ms:8.0f} ({wall_ms:6.0f}) {ratio:4.2f}x")
        print(f"{label:<18}" + "".join(f"{c:>22}" for c in cells))


def probe(families: list[str]) -> None:
    from sled_verifier.invariant import kernels, stable_rule

    for threads in (1, 2):
        torch.set_num_threads(threads)
        for family in families:
            for kernel in kernels(torch.device("cpu")):
                started = time.perf_counter()
                found = [stable_rule(kernel, *shape, torch.device("cpu"), torch.float32) for shape in SHAPES[family]]
                rules = ", ".join(f"{i}x{o}: {r.label() if r else 'none'}" for (i, o, _), r in zip(SHAPES[family], found))
                print(f"{threads} thread(s) {family:<14} {kernel:<7} {time.perf_counter() - started:6.1f} s   {rules}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="time plain, batch, loop and blocks forwards")
    parser.add_argument("--probe", nargs="*", metavar="FAMILY", help=f"probe these shapes: {', '.join(SHAPES)}")
    parser.add_argument("--target", type=Path, default=None, help="a model directory (default: SmolLM2-135M)")
    parser.add_argument("--runtime", default="compiled", choices=("transformers", "compiled"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads for --cost (0: all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every shape and variant")
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per step shape and round (median)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.target or smollm2_dir(), args.runtime, args.rounds, args.repeat)
    if args.probe is not None:
        probe(args.probe or list(SHAPES))


if __name__ == "__main__":
    main()
