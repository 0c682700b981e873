"""Draft cost per token at a given context: the exported graph's copying cache against the in-place one.

For every draft of a family (fp32 and int8), at each context length: fill a cache to that length, then
time one-token feeds, rolling back after each so every step sees the same context. Both caches are timed
in alternation (so drift on a busy machine hits both alike); the median of ``--repeats`` runs is printed
with the spread (min-max) and the ratio copy / bound.

    .venv/bin/python bench/draft_cache.py --family models/build/family-quick
    .venv/bin/python bench/draft_cache.py --drafts path/to/onnx-draft [...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sled_edge.draft_model import OnnxDraftModel  # noqa: E402


def ms_per_token(model: OnnxDraftModel, context: int, steps: int, seed: int) -> float:
    """Median ms of a one-token feed at ``context`` cached positions (rolled back after each step)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.vocab_size, context + steps).tolist()
    cache = model.new_cache()
    model.feed(cache, tokens[:context])
    times = []
    for token in tokens[context:]:
        started = time.perf_counter()
        model.feed(cache, [token])
        times.append(time.perf_counter() - started)
        cache.truncate(context)
    return 1000 * statistics.median(times)


def family_drafts(family: Path) -> list[Path]:
    manifest = json.loads((family / "manifest.json").read_text())
    return [family / draft[key] for draft in manifest["drafts"].values() for key in ("path", "path_int8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--family", type=Path, default=Path("models/build/family-quick"),
                        help="a built family: every draft in its manifest [default models/build/family-quick]")
    source.add_argument("--drafts", type=Path, nargs="+", help="ONNX draft directories instead of a family")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 960])
    parser.add_argument("--steps", type=int, default=100, help="timed one-token feeds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is printed")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    drafts = args.drafts or family_drafts(args.family)
    print(f"ms/token, median of {args.repeats} runs x {args.steps} feeds (min-max of the runs), "
          f"{args.threads} thread(s), CPU provider")
    print(f"{'draft':<28} {'context':>7} {'copy':>18} {'bound':>18} {'copy/bound':>10}")
    for path in drafts:
        models = {mode: OnnxDraftModel(path, threads=args.threads, provider="cpu", cache=mode)
                  for mode in ("copy", "bound")}
        if models["bound"].cache_mode != "bound":
            print(f"{path.name:<28} the in-place rewrite does not apply to this export")
            continue
        for context in args.contexts:
            runs: dict[str, list[float]] = {"copy": [], "bound": []}
            for repeat in range(args.repeats):
                for mode, model in models.items():
                    runs[mode].append(ms_per_token(model, context, args.steps, seed=repeat))
            cells = {mode: f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})" for mode, v in runs.items()}
            ratio = statistics.median(runs["copy"]) / statistics.median(runs["bound"])
            print(f"{path.name:<28} {context:>7} {cells['copy']:>18} {cells['bound']:>18} {ratio:>9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
