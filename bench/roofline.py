"""The verification step against the hardware's roofline (issue 22, item 2).

In one run, on the cores this process may use: the machine's memory bandwidth (the faster of a STREAM-like copy
and a read-only stream, with torch), its GEMM peak (the faster of the BLAS and oneDNN; float32, and bfloat16
where the CPU has AMX or AVX512-BF16, else said so), and for each step shape
N x M (N rows of M new tokens each, at a context of ``--context``) the verifier's forward time against the
bound max(bytes / bandwidth, FLOPs / peak), where bytes are the weights read once plus the rows' keys and
values read by attention, and FLOPs are the products (2 x weights x tokens, the vocabulary head included) plus
attention. Both runtimes (transformers, compiled), one and two threads. ``--profile-shape NxM`` then says where
one step's time goes (torch.profiler: products by row count, attention calls, the vocabulary head, and the rest:
Python and glue).

python bench/roofline.py [--target smollm2|family] [--runtimes transformers,compiled] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = [(1, 1), (1, 5), (4, 5), (16, 5), (64, 5)]


def log(message: str) -> None:
    print(f"[roofline {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


CLOCK = [time.perf_counter]  # wall time; process CPU time with one thread (see main)


def median_time(fn, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        started = CLOCK[0]()
        fn()
        samples.append(CLOCK[0]() - started)
    return float(np.median(samples))


def bandwidth_bytes_per_s(mib: int = 256, repeat: int = 7) -> dict:
    """A STREAM-like copy, b <- a over ``mib`` MiB (far beyond the caches; bytes moved = read + write), and a
    read-only stream (a sum: weights are only read); the bound takes the faster."""
    a = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    copy = 2 * a.numel() * 4 / median_time(lambda: b.copy_(a), repeat)
    read = a.numel() * 4 / median_time(lambda: a.sum(), repeat)
    return {"copy": copy, "read": read, "best": max(copy, read)}


def native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def gemm_flops_per_s(dtype: torch.dtype, size: int = 1536, repeat: int = 5) -> float:
    """The peak of one large square product: the faster of the BLAS (torch.mm) and, where the build has it,
    each of ``sled_verifier.invariant``'s own kernels (oneDNN's inner product over a weight reordered once, the
    native panel kernel) over a weight prepared once, as the verifier runs them."""
    from sled_verifier.invariant import kernels, prepare, product

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    best = median_time(lambda: torch.mm(a, b), repeat)
    for kernel in set(kernels(torch.device("cpu"))) - {"blas"}:
        try:
            packed = prepare(kernel, b.t().contiguous())  # a linear's weight is [out, in]: a @ b = a @ (b^T)^T
            best = min(best, median_time(lambda: product(kernel, a, packed, None, size), repeat))
        except RuntimeError:  # this kernel does not take the dtype
            continue
    return 2 * size**3 / best


def model_costs(target, rows: int, tokens: int, context: int) -> dict:
    """Bytes and FLOPs one step must at least move and compute."""
    model = target.model
    config = model.config
    weights = {id(p): p for p in model.parameters()}  # a tied head counts once: read once, as the head
    embedding = model.get_input_embeddings().weight
    tied = any(p is embedding for p in (model.get_output_embeddings().weight,))
    # a tied head's products read their own packed copy, in bfloat16 with bfloat16 weights (the float32 embedding
    # is only gathered, a few rows a step)
    head_element = 2 if tied and getattr(target, "weights", None) == torch.bfloat16 else embedding.element_size()
    weight_bytes = sum(p.numel() * (head_element if p is embedding else p.element_size()) for p in weights.values())
    # products' weights: 2-D as loaded or reordered, 3-D as native panels (whose zero fill past a non-multiple of
    # 64 outputs counts too: the kernel computes it)
    matmul_params = sum(p.numel() for p in weights.values() if p.dim() >= 2) - (0 if tied else embedding.numel())
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = embedding.element_size()
    width = context + tokens
    kv_bytes = rows * layers * 2 * kv_heads * head_dim * width * element
    n = rows * tokens
    flops = 2 * matmul_params * n + 2 * 2 * layers * heads * head_dim * width * n
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "flops": flops}


def step_fn(target, rows: int, tokens: int, context: int):
    kv = target.init_kv(max_slots=rows, max_length=context + tokens + 8)
    slots = [kv.acquire() for _ in range(rows)]
    rng = np.random.default_rng(0)
    target.forward_rows(slots, [0] * rows, [rng.integers(1, 1000, context).tolist() for _ in range(rows)], logits=False)
    return lambda: target.forward_rows(slots, [context] * rows, [[1] * tokens] * rows)


def measure(target, hardware: dict, context: int, repeat: int, shapes=SHAPES) -> list[dict]:
    out = []
    for rows, tokens in shapes:
        costs = model_costs(target, rows, tokens, context)
        seconds = median_time(step_fn(target, rows, tokens, context), repeat if rows < 64 else max(3, repeat // 2))
        memory_s = (costs["weight_bytes"] + costs["kv_bytes"]) / hardware["bandwidth"]
        compute_s = costs["flops"] / hardware["peak"]
        bound = max(memory_s, compute_s)
        out.append({"shape": f"{rows}x{tokens}", "ms": 1000 * seconds, "bound_ms": 1000 * bound,
                    "memory_ms": 1000 * memory_s, "compute_ms": 1000 * compute_s, "over_bound": seconds / bound,
                    "gflops": costs["flops"] / seconds / 1e9, **costs})
        log(f"{target.name} {rows}x{tokens}: {1000 * seconds:.1f} ms, bound {1000 * bound:.1f} ms ({seconds / bound:.2f}x)")
    return out


def where_it_goes(target, rows: int, tokens: int, context: int) -> dict:
    """One step under torch.profiler: self CPU time by kind of work, and what no operator accounts for."""
    from torch.profiler import ProfilerActivity, profile

    step = step_fn(target, rows, tokens, context)
    step_s = median_time(step, 3)  # without the profiler, on this run's clock
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    vocab = target.vocab_size
    kinds: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        name, shapes = event.key, [s or [] for s in (event.input_shapes or [])]
        if name.startswith("sled::native_linear"):  # [rows x in x out], float32 or _bf16
            rows_in_out = [int(v) for v in name[name.index("[") + 1:-1].split("x")]
            kind = "vocabulary head" if rows_in_out[2] == vocab else f"products of {rows_in_out[0]} rows"
        elif name in ("aten::addmm", "aten::mm", "aten::bmm", "mkldnn::_linear_pointwise"):
            operand = shapes[1] if name == "aten::addmm" and len(shapes) > 1 else (shapes[0] if shapes else [])
            operand = [1, *operand] if len(operand) == 1 else operand
            m = operand[-2] if len(operand) >= 2 else 0
            kind = "vocabulary head" if any(vocab in s for s in shapes) else f"products of {m} rows"
        elif "scaled_dot_product" in name or "attention" in name:
            kind = "attention"
        else:
            kind = "other operators"
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
        calls[kind] = calls.get(kind, 0) + event.count
    # Operator times are the profiler's (wall clock, with its own overhead): read them as shares of the step; what
    # the step took without the profiler beyond their sum is Python and glue between operators.
    accounted = sum(kinds.values())
    shares = {k: v / accounted for k, v in kinds.items()}
    return {"shape": f"{rows}x{tokens}", "step_ms": 1000 * step_s, "shares": shares,
            "ms": {k: round(1000 * v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "operators_ms": 1000 * accounted, "calls": calls, "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("smollm2", "family"), default="smollm2")
    parser.add_argument("--smollm2-dir", type=Path, default=None)
    parser.add_argument("--family", type=Path, default=ROOT / "models" / "build" / "family-quick")
    parser.add_argument("--runtimes", default="transformers,compiled")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtype", default="float32", help="the target's dtype (bfloat16: a user's choice)")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--shapes", default=",".join(f"{r}x{m}" for r, m in SHAPES), help="N x M step shapes")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-invariance", action="store_true", help="plain kernels (server-only's forward)")
    parser.add_argument("--profile-shape", default="", help="e.g. 16x5: where one step's time goes, per runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.target == "smollm2":
        from bench.fleet_target import smollm2_dir

        target_dir = smollm2_dir(args.smollm2_dir)
    else:
        from bench.fleet import quick_shape_target

        target_dir = args.family / "target" if (args.family / "manifest.json").is_file() else \
            quick_shape_target(ROOT / "build" / "bench" / "quick-shape-target")
    from sled_verifier.runtime import load_target

    result = {"target": f"{args.target} ({target_dir})", "dtype": args.dtype, "context": args.context,
              "batch_invariant": not args.no_invariance, "runs": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        # One thread: CPU seconds, which a shared machine's other work does not inflate (time descheduled is not
        # counted); two: wall time (CPU time would add both threads), honest only on a quiet machine.
        CLOCK[0] = time.process_time if threads == 1 else time.perf_counter
        streams = bandwidth_bytes_per_s()
        hardware = {"bandwidth": streams["best"], "copy": streams["copy"], "read": streams["read"],
                    "peak": gemm_flops_per_s(torch.float32)}
        if args.dtype == "bfloat16" or native_bf16():
            hardware["peak_bf16"] = gemm_flops_per_s(torch.bfloat16)
        if args.dtype == "bfloat16":
            hardware["peak"] = hardware["peak_bf16"]
        log(f"{threads} thread(s): copy {hardware['copy'] / 1e9:.1f} GB/s, read {hardware['read'] / 1e9:.1f} GB/s, float32 GEMM "
            f"{hardware['peak'] / 1e9:.1f} GFLOP/s" + (f", bfloat16 {hardware['peak_bf16'] / 1e9:.1f}" if "peak_bf16" in hardware else ""))
        for runtime in args.runtimes.split(","):
            target = load_target(target_dir, runtime, device="cpu", dtype=args.dtype, batch_invariant=not args.no_invariance)
            run = {"threads": threads, "runtime": runtime, "hardware": hardware, "products": target.batch_invariance,
                   "clock": "process CPU time" if threads == 1 else "wall time",
                   "shapes": measure(target, hardware, args.context, args.repeat,
                                     [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")])}
            if args.profile_shape:
                rows, tokens = (int(v) for v in args.profile_shape.split("x"))
                run["profile"] = where_it_goes(target, rows, tokens, args.context)
            result["runs"].append(run)
            del target
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"roofline-{args.target}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({**result, "runs": [{k: v for k, v in r.items()} for r in result["runs"]]}, indent=2,
                               default=str))
    log(f"wrote {path}")
    return 0


def print_table(result: dict) -> None:
    print(f"\nthe step at the roofline: {result['target']}, {result['dtype']}, context {result['context']}, "
          f"batch invariance {'on' if result['batch_invariant'] else 'off'}")
    print(f"native bfloat16 (AMX / AVX512-BF16): {'yes' if native_bf16() else 'no'}")
    for run in result["runs"]:
        hw = run["hardware"]
        print(f"\n{run['runtime']}, {run['threads']} thread(s), {run['clock']}, products {run.get('products', '?')}: "
              f"copy {hw.get('copy', hw['bandwidth']) / 1e9:.1f} GB/s, read {hw.get('read', 0) / 1e9:.1f} GB/s, GEMM "
              f"{hw['peak'] / 1e9:.1f} GFLOP/s" + (f" (bfloat16 {hw['peak_bf16'] / 1e9:.1f})" if "peak_bf16" in hw else ""))
        print("  shape      ms   bound ms  (memory / compute)  x bound  GFLOP/s")
        for s in run["shapes"]:
            print(f"  {s['shape']:>5}  {s['ms']:>7.1f}  {s['bound_ms']:>8.1f}  ({s['memory_ms']:>6.1f} / {s['compute_ms']:>6.1f})"
                  f"  {s['over_bound']:>6.2f}x  {s['gflops']:>7.1f}")
        if "profile" in run:
            p = run["profile"]
            print(f"  where {p['shape']} goes ({p['step_ms']:.1f} ms a step; shares of operator time under the profiler, "
                  f"{sum(p['calls'].values())} operator calls): "
                  + ", ".join(f"{k} {p['shares'][k]:.0%} ({p['calls'].get(k, 0)} calls)" for k in p["ms"]))


if __name__ == "__main__":
    sys.exit(main())
