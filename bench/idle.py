"""Does a verification pass cost more after the idle gaps between rounds? (issue 22, item 8)

A SLED verifier is idle between rounds by design (it waits for drafts), while a server-only decoder runs its
steps back to back. If the core cools in the gap (frequency, sleep states, caches, another process taking the
core), the same pass costs more inside the service than timed alone. This times the verifier's own forward
(``forward_rows``, batch-invariant as the service runs it) at N x M (N rows of M tokens at ``--context``) on
one pinned core with one torch thread:

- ``gap G ms``: the pass after sleeping G ms since the previous pass ended (``0``: back to back);
- ``spin G ms``: the pass after G ms of busy-waiting instead (the core held, nothing else runs on it: what is
  left of the gap's cost is not the core's own cooling but the pass itself);
- ``touch G ms``: the G ms gap ending in one read of every weight, the cheapest warm-up: the trade is the
  pass's CPU saved against the touch's CPU spent (both printed);

every condition interleaved in one loop (each sample preceded by a pass of the previous sample), ``--samples``
samples each, the whole repeated ``--repeats`` times; per repeat the median wall time and the median process
CPU time of the pass alone (the gap is not counted; a spin's or touch's CPU is printed beside it). Prints the
load average before and after, and how much of the time the core was idle (/proc/stat): a core that others keep
busy while this one sleeps never cools.

python bench/idle.py [--target smollm2|family] [--shapes 1x5,4x5] [--gaps-ms 0,5,20,50] [--spin-ms 20] [--touch-ms 50]
    [--samples 40] [--repeats 3] [--core 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.run import SERVER_CORES, log  # noqa: E402


def target_dir(name: str) -> Path:
    if name == "smollm2":
        from bench.fleet_target import smollm2_dir

        return smollm2_dir(None)
    family = ROOT / "models" / "build" / "family-quick" / "target"
    if (family / "config.json").is_file():
        return family
    from bench.fleet import quick_shape_target

    log("no built family: a random-initialised target of its shape (same cost)")
    return quick_shape_target(ROOT / "build" / "bench" / "quick-shape-target")


def core_ticks(core: int) -> tuple[int, int]:
    """(idle, total) clock ticks of ``core`` so far (/proc/stat): how often the core really was idle."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(v) for v in line.split()[1:]]
            return ticks[3] + ticks[4], sum(ticks[:8])
    return 0, 0


def spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def touch(weights: list[torch.Tensor]) -> None:
    """Read every weight once (the cheapest way to bring the working set back into the caches)."""
    for weight in weights:  # a weight in oneDNN's own layout (sled_verifier.invariant) is read by densifying it
        (weight.to_dense() if weight.is_mkldnn else weight).sum()


def conditions(gaps_ms: list[float], spin_ms: list[float], touch_ms: list[float]) -> list[tuple[str, float]]:
    return [("gap", g) for g in gaps_ms] + [("spin", s) for s in spin_ms] + [("touch", t) for t in touch_ms]


def measure(target, rows: int, width: int, context: int, conds: list[tuple[str, float]], samples: int,
            seed: int) -> dict[tuple[str, float], tuple[float, float, float]]:
    """Median (wall s, CPU s, preparation CPU s) of one N x M pass per condition, the conditions interleaved in a
    shuffled order that changes each round (so no condition always follows the same one). Preparation: what a
    condition spends before the pass to keep it warm (a spin's or a touch's CPU; 0 for a plain gap)."""
    kv = target.init_kv(max_slots=rows, max_length=context + width + 8)
    slots = [kv.acquire() for _ in range(rows)]
    rng = np.random.default_rng(seed)
    prefix = [rng.integers(1, 1000, context).tolist() for _ in range(rows)]
    target.forward_rows(slots, [0] * rows, prefix, logits=False)
    tokens = [[1] * width] * rows
    weights = list({id(p): p for p in target.model.parameters()}.values())

    def one_pass() -> None:
        target.forward_rows(slots, [context] * rows, tokens)

    for _ in range(3):
        one_pass()
    samples_of = {c: [] for c in conds}
    with torch.inference_mode():
        for _ in range(samples):
            for index in rng.permutation(len(conds)):
                kind, ms = conds[index]
                c0 = time.process_time()
                if kind == "spin":
                    spin(ms / 1000.0)
                else:
                    time.sleep(ms / 1000.0) if ms else None
                    touch(weights) if kind == "touch" else None
                w1, c1 = time.perf_counter(), time.process_time()
                one_pass()
                w2, c2 = time.perf_counter(), time.process_time()
                samples_of[conds[index]].append((w2 - w1, c2 - c1, c1 - c0))
    return {c: tuple(float(v) for v in np.median(np.array(samples_of[c]), axis=0)) for c in conds}


def idle_gap_s(metrics: dict[str, float], window_s: float) -> float:
    """A verifier's mean idle gap between steps over a window, from its metrics' change over it: the time not
    spent in steps (taking a batch to its verdicts published) over the steps run; 0 without a step."""
    steps = metrics.get("sled_verifier_batch_size_count", 0.0)
    if steps <= 0:
        return 0.0
    return max(0.0, window_s - metrics.get("sled_verifier_busy_seconds_total", 0.0)) / steps


def cpu_after_gap(target, rows: int, width: int, context: int, gap_s: float, samples: int = 9) -> float:
    """How many times the CPU of one N x M pass after ``gap_s`` idle is that of the same pass back to back
    (medians, interleaved): what a server that idles between rounds pays over a ceiling timed back to back."""
    gap = ("gap", 1000.0 * gap_s)
    medians = measure(target, rows, width, context, [("gap", 0.0), gap], samples, seed=0)
    return medians[gap][1] / medians[("gap", 0.0)][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("smollm2", "family"), default="smollm2")
    parser.add_argument("--shapes", default="1x5,4x5", help="N x M pass shapes, comma-separated")
    parser.add_argument("--gaps-ms", default="0,5,20,50", help="idle (sleeping) gaps before the pass")
    parser.add_argument("--spin-ms", default="20", help="busy-waiting gaps before the pass ('' for none)")
    parser.add_argument("--touch-ms", default="50", help="idle gaps ending in a read of every weight ('' for none)")
    parser.add_argument("--context", type=int, default=92, help="tokens already in each row's cache (the fleet's mean)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--core", type=int, default=min(SERVER_CORES),
                        help="the core to pin to [default: the verifier's]")
    parser.add_argument("--no-batch-invariant", action="store_true", help="the plain kernels (server-only's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {args.core})
    from sled_verifier.runtime import load_target

    directory = target_dir(args.target)
    target = load_target(directory, "transformers", device="cpu", batch_invariant=not args.no_batch_invariant)
    def ms_list(text: str) -> list[float]:
        return [float(v) for v in text.split(",") if v]

    conds = conditions(ms_list(args.gaps_ms), ms_list(args.spin_ms), ms_list(args.touch_ms))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"idle bench: {args.target} ({directory.name}), batch invariance {target.batch_invariance}, core "
          f"{args.core}, 1 torch thread, context {args.context}, medians of {args.samples}, "
          f"load before {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for rows, width in shapes:
        idle_before, total_before = core_ticks(args.core)
        results = [measure(target, rows, width, args.context, conds, args.samples, seed)
                   for seed in range(args.repeats)]
        idle_after, total_after = core_ticks(args.core)
        idle_share = (idle_after - idle_before) / max(1, total_after - total_before)
        base = [r[("gap", 0.0)] if ("gap", 0.0) in r else r[conds[0]] for r in results]
        print(f"\n{rows}x{width}: ms per pass, wall / CPU (x back to back) + CPU spent keeping warm, each repeat; "
              f"core {args.core} idle {idle_share:.0%} of the time meanwhile")
        for cond in conds:
            cells = "   ".join(f"{1000 * r[cond][0]:6.2f} / {1000 * r[cond][1]:6.2f} ({r[cond][1] / b[1]:.2f}x) "
                               f"+ {1000 * r[cond][2]:5.2f}" for r, b in zip(results, base))
            print(f"  {cond[0]:>4} {cond[1]:>4g} ms   {cells}")
    print(f"\nload after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
