"""What exactness costs: the target's forward with plain kernels, batch invariant, and batch + width invariant.

``--cost`` times one runtime's forward on a real target (default: the converted SmolLM2-135M-Instruct) at the
shapes that matter: a lone one-token row (server-only decoding), one 5-token verification (k = 4), 16 and 64
of them, and a 256-token prefill chunk, each after a 128-token context; three regimes on the same weights:

- ``plain``: the BLAS's own kernels, one masked SDPA per row (``--no-batch-invariant``);
- ``batch``: products padded to the probed row group (``sled_verifier.invariant``), attention per row;
- ``exact``: batch invariant and width invariant (one SDPA per query, ``attend_rows``): the default.

``--probe`` runs the load-time probe on the weight shapes of real models (random weights) at 1 and 2 threads
and prints each shape's row group and the probe's time. Timings on a shared machine are noisy: run it three
times (``--repeat``) and read the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SMOLLM2 = Path("/root/.cache/sled-wheels/smollm2-hf")
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
CASES = [("lone 1-token row", 1, 1), ("1 x 5", 1, 5), ("16 x 5", 16, 5), ("64 x 5", 64, 5), ("prefill 1 x 256", 1, 256)]
CONTEXT = 128


def plain(target) -> None:
    """The BLAS's own products back (the instance's invariant ``forward`` removed) and one SDPA per row."""
    for module in target.model.modules():
        if type(module) is nn.Linear and "forward" in vars(module):
            del module.forward
    target.width_invariant = False


def timed_ms(target, rows: int, tokens: int, repeat: int) -> float:
    slots = list(range(rows))
    inputs = [[(7 * r + t) % 1000 + 3 for t in range(tokens)] for r in range(rows)]
    logits = tokens <= 16
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        started = time.perf_counter()
        target.forward_rows(slots, [CONTEXT] * rows, inputs, logits=logits)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def cost(model_dir: Path, runtime: str, repeat: int) -> None:
    from sled_verifier.runtime import load_target

    target = load_target(model_dir, runtime, "cpu")
    target.init_kv(max_slots=64, max_length=CONTEXT + 512)
    for slot in range(64):
        target.kv.acquire()
    target.width_invariant = False  # the contexts' values do not matter to the timings: fill them quickly
    target.forward_rows(list(range(64)), [0] * 64, [[3 + r] * CONTEXT for r in range(64)], logits=False)
    target.width_invariant = True
    regime = target.batch_invariance
    results: dict[str, dict[str, float]] = {"exact": {}, "batch": {}, "plain": {}}
    for label, rows, tokens in CASES:
        results["exact"][label] = timed_ms(target, rows, tokens, repeat)
    target.width_invariant = False
    for label, rows, tokens in CASES:
        results["batch"][label] = timed_ms(target, rows, tokens, repeat)
    plain(target)
    for label, rows, tokens in CASES:
        results["plain"][label] = timed_ms(target, rows, tokens, repeat)
    print(f"{model_dir.name}, {runtime} runtime, {torch.get_num_threads()} threads, {regime}, context {CONTEXT}, "
          f"median of {repeat} (ms; x plain)")
    print(f"{'shape':<18}{'plain':>10}{'batch':>16}{'exact':>16}")
    for label, _, _ in CASES:
        base = results["plain"][label]
        cells = [f"{results[m][label]:8.1f} {results[m][label] / base:4.2f}x" for m in ("batch", "exact")]
        print(f"{label:<18}{base:10.1f}{cells[0]:>16}{cells[1]:>16}")


def probe(families: list[str]) -> None:
    from sled_verifier.invariant import stable_group

    for threads in (1, 2):
        torch.set_num_threads(threads)
        for family in families:
            found = []
            started = time.perf_counter()
            for shape in SHAPES[family]:
                found.append(stable_group(*shape, torch.device("cpu"), torch.float32))
            groups = ", ".join(f"{i}x{o}: {g if g else 'none'}" for (i, o, _), g in zip(SHAPES[family], found))
            print(f"{threads} thread(s) {family:<14} {time.perf_counter() - started:6.1f} s   {groups}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="time plain, batch and exact forwards")
    parser.add_argument("--probe", nargs="*", metavar="FAMILY", help=f"probe these shapes: {', '.join(SHAPES)}")
    parser.add_argument("--target", type=Path, default=SMOLLM2)
    parser.add_argument("--runtime", default="compiled", choices=("transformers", "compiled"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads for --cost (0: all cores)")
    parser.add_argument("--repeat", type=int, default=5, help="timed forwards per shape (median)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.target, args.runtime, args.repeat)
    if args.probe is not None:
        probe(args.probe or list(SHAPES))


if __name__ == "__main__":
    main()
