"""llama.cpp side by side (issue 22, item 7): what a user would pick instead on a CPU, on the same model.

llama.cpp's server (Ollama is built on it) batches parallel slots continuously: each step decodes one token for
every active sequence in one ``llama_decode`` call. This stage does exactly that with llama-cpp-python's
low-level API: N sequences, each with a context of ``--context`` tokens (prefilled first), then ``--steps``
steps of N tokens (one per sequence, logits for each), one thread, on the server's core. It reports ms a step
and CPU ms per token, beside SLED's and server-only's from the latest fleet result on the same target.

Same model and precision: SmolLM2-135M-Instruct's GGUF (Q4_1, the shipped one) dequantized to an F32 GGUF
here, tensor by tensor in GGUF's own layout with its metadata and tokenizer copied; the float32 Hugging Face
directory the verifier serves is converted from the same file, so both run the same float32 weights.

Optional: ``pip install llama-cpp-python==0.3.36`` (a ``bench-llamacpp`` extra; builds from source in
minutes). Without it the stage prints why it was skipped and exits 0.

python bench/llamacpp.py [--ns 1,4,16,64] [--gguf SRC.gguf] [--fleet-result bench/results/fleet-smollm2-*.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402



def shipped_gguf() -> Path:
    """The shipped GGUF: ``SLED_SMOLLM2_GGUF``, else the project's fetch (``sled_models.pretrained``, cached)."""
    if os.environ.get("SLED_SMOLLM2_GGUF"):
        return Path(os.environ["SLED_SMOLLM2_GGUF"])
    from sled_models.pretrained import fetch_smollm2

    return fetch_smollm2()


def log(message: str) -> None:
    print(f"[llamacpp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def f32_gguf(source: Path, out: Path) -> Path:
    """``source`` with every quantized tensor dequantized to F32 (GGUF layout kept), metadata copied."""
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order: the GGUF dims reversed
        tensors.append((tensor.name, np.ascontiguousarray(data.reshape(shape))))
    for name, data in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    return out


class Decoder:
    """One llama.cpp context holding ``n`` sequences; ``step`` decodes one token for each in one call."""

    def __init__(self, llama_cpp, model_path: Path, n: int, context: int, steps: int, threads: int) -> None:
        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n * (context + steps + 8)
        cparams.n_batch = max(n * context, n)
        cparams.n_ubatch = min(512, cparams.n_batch)
        cparams.n_seq_max = n
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n, self.vocab = n, llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, n)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) per entry, in one ``llama_decode``."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed (context full?)")

    def prefill(self, contexts: list[list[int]]) -> None:
        for seq, tokens in enumerate(contexts):  # one sequence at a time: the server's prompt processing
            self._decode([(t, p, seq, p == len(tokens) - 1) for p, t in enumerate(tokens)])

    def step(self, tokens: list[int], position: int) -> list[int]:
        """Every sequence's next token (argmax) after ``tokens``: one continuous-batching step."""
        self._decode([(t, position, seq, True) for seq, t in enumerate(tokens)])
        out = []
        for i in range(self.n):
            row = np.ctypeslib.as_array(ctypes.cast(self.ll.llama_get_logits_ith(self.ctx, i),
                                                    ctypes.POINTER(ctypes.c_float)), shape=(self.vocab,))
            out.append(int(row.argmax()))
        return out

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def measure(llama_cpp, model_path: Path, n: int, context: int, steps: int, threads: int) -> dict:
    decoder = Decoder(llama_cpp, model_path, n, context, steps, threads)
    try:
        rng = np.random.default_rng(0)
        decoder.prefill([rng.integers(100, 40_000, context).tolist() for _ in range(n)])
        tokens = [1] * n
        tokens = decoder.step(tokens, context)  # warm-up
        samples, cpu_started = [], time.process_time()
        for i in range(steps):
            started = time.perf_counter()
            tokens = decoder.step(tokens, context + 1 + i)
            samples.append(time.perf_counter() - started)
        cpu_s = time.process_time() - cpu_started
    finally:
        decoder.close()
    return {"n": n, "step_ms_median": 1000 * float(np.median(samples)), "step_ms_min": 1000 * min(samples),
            "cpu_ms_per_token": 1000 * cpu_s / (steps * n), "steps": steps}


def fleet_figures(path: Path | None) -> dict[int, dict]:
    """SLED's and server-only's server CPU per token by N from a fleet result (the latest SmolLM2 one)."""
    if path is None:
        found = sorted((ROOT / "bench" / "results").glob("fleet-smollm2-*.json"), key=lambda p: p.stat().st_mtime)
        path = found[-1] if found else None
    if path is None or not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["n"]: {"sled": r["sled_ms_per_token"], "server_only": r["server_only_ms_per_token"], "file": path.name}
            for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="1,4,16,64")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gguf", type=Path, default=None, help="the shipped GGUF to dequantize to F32 [default: fetched]")
    parser.add_argument("--fleet-result", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError as exc:
        print(f"llama.cpp stage skipped: llama-cpp-python is not installed ({exc}); "
              "pip install llama-cpp-python==0.3.36 (builds from source, a few minutes; needs cmake and a C++ compiler)")
        return 0
    args.gguf = args.gguf or shipped_gguf()
    if not args.gguf.is_file():
        print(f"llama.cpp stage skipped: no GGUF at {args.gguf} (set SLED_SMOLLM2_GGUF or --gguf)")
        return 0
    from bench.run import SERVER_CORES

    os.sched_setaffinity(0, SERVER_CORES)
    work = ROOT / "build" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    log(f"dequantizing {args.gguf.name} to F32 (once)")
    model_path = f32_gguf(args.gguf, work / (args.gguf.stem.split(".")[0] + ".F32.gguf"))
    rows = []
    for n in [int(v) for v in args.ns.split(",")]:
        rows.append(measure(llama_cpp, model_path, n, args.context, args.steps, args.threads))
        log(f"N={n}: {rows[-1]['step_ms_median']:.1f} ms a step, {rows[-1]['cpu_ms_per_token']:.2f} CPU ms a token")
    fleet = fleet_figures(args.fleet_result)
    print(f"\nllama.cpp {llama_cpp.__version__} (llama-cpp-python), {model_path.name}, {args.threads} thread(s) on core "
          f"{sorted(SERVER_CORES)}, context {args.context}, one token per sequence per llama_decode (continuous batching)")
    print("    N  ms/step (median, min)  llama.cpp CPU ms/tok  SLED ms/tok  server-only ms/tok" +
          (f"   (fleet: {next(iter(fleet.values()))['file']})" if fleet else "   (no fleet result on smollm2 yet)"))
    for r in rows:
        f = fleet.get(r["n"], {})
        print(f"  {r['n']:>3}  {r['step_ms_median']:>8.1f} {r['step_ms_min']:>8.1f}  {r['cpu_ms_per_token']:>20.2f}  "
              f"{f.get('sled', float('nan')):>11.2f}  {f.get('server_only', float('nan')):>18.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"llamacpp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"version": llama_cpp.__version__, "model": str(model_path), "threads": args.threads,
                                "context": args.context, "rows": rows, "fleet": {str(k): v for k, v in fleet.items()}},
                               indent=2))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
