"""The verifier's own CPU kernels (``csrc/*.c``): built once per machine with its C compiler, called through ctypes.

Why our own: at the 1-5 rows of a verification step a float32 product is a stream of its weight, and neither
of torch's CPU kernels streams it at memory speed on one core (MKL's small-M GEMM re-packs the weight on every
call; oneDNN's inner product reads it at ~2/3 of the read bandwidth). ``csrc/linear.c`` reads a weight packed once
into 64-output panels as one contiguous stream, and is batch invariant by construction (each output one fused
multiply-add chain over its inputs in order), so no row padding is needed either. It is one candidate of the
load-time probe (``sled_verifier.invariant``), which checks its invariance bitwise like any other kernel's.

Every ``csrc/*.c`` is built, as one library, with ``-O3 -march=native`` (no fast-math: the arithmetic is the one
written) into ``$SLED_CACHE/native/kernels-<key>.so``, the key covering the sources, the flags, the compiler and
this CPU's flags, so a cache shared between machines never loads another CPU's build. Without a C compiler, or
on a CPU without AVX2 and FMA, there is no native kernel and the probe keeps torch's. ``SLED_NATIVE=0`` turns it
off. Kernels run at torch's thread count (``threads``): a product's 64-output panels (attention's (row, key/value head) tasks)
are split in contiguous shares between the calling thread and a small pool of workers (``csrc/pool.c``), which
spin briefly between a forward's kernels and then sleep; an output's arithmetic does not depend on its thread,
so the bits do not depend on the thread count.

A forward whose products and attention are these kernels runs torch's own operators inline (``torch_inline``):
torch's OpenMP workers spin for milliseconds after each parallel operator (libgomp's default wait policy), and
on a machine with as many cores as threads a spinning worker holds the core the pool's worker needs. At two
threads on two cores one residual add a layer was enough for the products to run on about one core (a 64 x 5
SmolLM2 step ~1.2x faster than one thread; with OMP_WAIT_POLICY=PASSIVE ~1.8x), and with other processes on
the machine a 16 x 5 step took ~4x the one-thread time. Between these kernels torch's operators are glue (adds,
an embedding, a few small copies) that one thread does in microseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import structlog
import torch

from sled_verifier.gguf import sled_cache_dir

log = structlog.get_logger("sled_verifier")

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-pthread")
PANEL = 64  # outputs per packed panel (csrc/linear.c's PANEL)
P, I64 = ctypes.c_void_p, ctypes.c_int64


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cc: str) -> Path:
    """The compiled library, from the cache when this source, compiler and CPU built it before."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    sources = sorted(SOURCES.glob("*.c"))
    texts = [f"{p.name}\0{p.read_text()}" for p in sorted(SOURCES.glob("*.[ch]"))]  # headers count too
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version, cpu_flags()]).encode()).hexdigest()[:16]
    target = sled_cache_dir() / "native" / f"kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([cc, *FLAGS, "-o", str(built), *map(str, sources)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "cc failed")
            os.replace(built, target)  # atomic: a concurrent loader sees the whole library or none
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, no AVX2/FMA, a failed build, ``SLED_NATIVE=0``), said once."""
    if os.environ.get("SLED_NATIVE", "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.info("native_kernels_unavailable", reason="no C compiler (cc/gcc, or $CC)")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("native_kernels_unavailable", reason=str(exc))
        return None
    return lib


@functools.cache
def function(name: str, *argtypes, returns=None) -> ctypes._CFuncPtr | None:
    """The library's C function ``name`` with its argument types set (returning void, or ``returns``), or None
    without it."""
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), returns
    return fn


_inline = threading.local()  # .threads: the kernels' thread count while torch's operators run inline


def threads() -> int:
    """The threads a kernel runs on: torch's count, or, inside ``torch_inline``, the count torch had before."""
    return getattr(_inline, "threads", 0) or torch.get_num_threads()


@contextlib.contextmanager
def torch_inline():
    """Torch's operators on this thread run on one thread, the native kernels on torch's count (see the module
    docstring for why); a no-op at one thread or without the kernels. Nests. MKL's thread count is the
    process's, so torch products another Python thread runs meanwhile get one thread too (the verifier runs one
    forward at a time)."""
    count = torch.get_num_threads()
    if count == 1 or getattr(_inline, "threads", 0) or not available():
        yield
        return
    _inline.threads = count
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)
        _inline.threads = 0


def call(fn, arguments: tuple, label):
    """``fn(*arguments)``, named ``label()`` for torch.profiler when it records (bench/roofline.py --profile-shape)."""
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(label()):
            return fn(*arguments)
    return fn(*arguments)


def available() -> bool:
    return library() is not None


BF16_KINDS = {0: None, 1: "amx", 2: "avx512-bf16"}
BF16_STEP = 32  # a bfloat16 panel's inputs are padded to a multiple of this (csrc/linear_bf16.c's KSTEP)


@functools.cache
def bf16_products() -> str | None:
    """The bfloat16-weight product this machine runs (``csrc/linear_bf16.c``): ``amx`` (Intel's tile unit),
    ``avx512-bf16`` (its dot products, e.g. AMD Zen 4), or None (no such instructions, or no native kernels).
    ``SLED_AMX=0`` keeps AVX512-BF16 on a CPU with both (the two round differently: other bits)."""
    fn = function("sled_bf16_kind", returns=ctypes.c_int)
    return BF16_KINDS.get(fn(), None) if fn is not None else None


def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out, in]`` float32 -> panels ``[ceil(out / 64), in, 64]`` (zero rows fill the last panel): once, at load.
    ``dtype=torch.bfloat16``: rounded to bfloat16 (to nearest even) as ``[ceil(out / 64), in2 / 2, 64, 2]``, each
    output's weights for a pair of inputs side by side, ``in2`` the inputs padded with zeros to a multiple of 32
    (``csrc/linear_bf16.c``)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise RuntimeError("native kernels take float32 on the CPU")
    if dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError(f"native kernels pack weights in float32 or bfloat16, not {dtype}")
    width = PANEL
    out, features = weight.shape
    padded = -(-out // width) * width
    if padded != out:
        weight = torch.cat([weight, weight.new_zeros(padded - out, features)])
    if dtype == torch.float32:
        return weight.reshape(padded // width, width, features).transpose(1, 2).contiguous()
    if bf16_products() is None:
        raise RuntimeError("this CPU has no bfloat16 product (AMX or AVX512-BF16) for the native kernels")
    inputs = -(-features // BF16_STEP) * BF16_STEP
    if inputs != features:
        weight = torch.cat([weight, weight.new_zeros(padded, inputs - features)], dim=1)
    weight = weight.to(torch.bfloat16).reshape(padded // width, width, inputs // 2, 2)
    return weight.permute(0, 2, 1, 3).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[T, in]`` float32 and ``packed`` from ``pack``: ``[T, out]``."""
    bf16 = packed.dtype == torch.bfloat16
    fn = function("sled_linear_bf16_threads", P, P, P, P, I64, I64, I64, I64, ctypes.c_int, returns=ctypes.c_int) \
        if bf16 else function("sled_linear_threads", P, P, P, P, I64, I64, I64, I64, ctypes.c_int)
    if fn is None:
        raise RuntimeError("native kernels unavailable")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise RuntimeError("native kernels take float32 on the CPU")
    x = x.contiguous()
    rows, features = x.shape
    panels = packed.shape[0]
    taken = packed.shape[1] * 2 if bf16 else packed.shape[1]  # the inputs the packing holds (bfloat16: padded to 32)
    if taken != (-(-features // BF16_STEP) * BF16_STEP if bf16 else features):
        raise RuntimeError(f"a packed weight of {tuple(packed.shape)} does not take {features} inputs")
    if bias is not None:
        bias = bias.contiguous()
    y = x.new_empty(rows, out_features)
    args = (x.data_ptr(), packed.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), rows,
            features, out_features, panels, threads())
    if bf16:
        if call(fn, args, lambda: f"sled::native_linear_bf16[{rows}x{features}x{out_features}]") != 0:
            raise RuntimeError("no bfloat16 product on this CPU (or out of memory)")
        return y
    call(fn, args, lambda: f"sled::native_linear[{rows}x{features}x{out_features}]")
    return y


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``x`` ``[T, V]`` float32 on the CPU (``csrc/elementwise.c``: torch's answer, the
    first maximum or the first NaN, at memory speed): int64 ``[T]``. torch's own without the kernels."""
    fn = function("sled_argmax_rows", P, I64, I64, P)
    if fn is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] == 0:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    call(fn, (x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr()), lambda: f"sled::native_argmax[{x.shape[0]}]")
    return out


def attends(head_dim: int) -> bool:
    """Whether ``attend`` serves this head size (whole vectors of 16 floats, at most 128): the rest keep SDPA."""
    return available() and head_dim % 16 == 0 and head_dim <= 128


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, longest: int,
           scale: float) -> torch.Tensor:
    """Slot attention of ``csrc/attention.c``: ``query`` ``[B, H, M, D]``, ``key``/``value`` one layer's store
    ``[S+1, Hkv, L, D]`` read in place, ``rows`` ``[B, 3]`` int64 (slot, start, m), ``longest`` the largest
    start + m. Returns ``[B, M, H, D]`` (zero past each row's m)."""
    fn = function("sled_attend", P, I64, I64, I64, P, P, I64, I64, I64, P, P, I64, I64, I64, I64, I64,
                  ctypes.c_float, P, I64, ctypes.c_int)
    if fn is None:
        raise RuntimeError("native kernels unavailable")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (query, key, value)):
        raise RuntimeError("native attention takes float32 on the CPU, unit stride along the head dimension")
    if key.stride() != value.stride():
        raise RuntimeError("native attention reads keys and values with one layout")
    batch, heads, m_max, head_dim = query.shape
    out = query.new_zeros(batch, m_max, heads, head_dim)
    count = min(threads(), batch * key.shape[1])  # (row, key/value head) tasks share out
    per_thread = (longest + head_dim) * 16
    scratch = query.new_empty(per_thread * count)
    arguments = (query.data_ptr(), *query.stride()[:3], key.data_ptr(), value.data_ptr(), *key.stride()[:3],
                 out.data_ptr(), rows.data_ptr(), batch, heads, key.shape[1], m_max, head_dim, scale,
                 scratch.data_ptr(), per_thread, count)
    call(fn, arguments, lambda: f"sled::native_attention[{batch}x{m_max}]")
    return out
