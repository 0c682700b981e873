"""Batch invariance: a row's logits must not depend on which other rows share its forward.

Everything in a decoder is per token (embedding, norms, rotary, activations) or per row (slot attention reads
one row's slot over its own length), except the matrix products, whose kernel - and so its order of
summation - may depend on the row count and on where a row falls in it. With MKL a lone row goes through a
matrix-vector kernel and rows past the last full group of 4 through an edge kernel: a one-token row's logits
are ~1e-6 away from the same row inside a batch, enough to flip an argmax near a tie.

So at load ``make_batch_invariant`` probes each distinct weight shape of the model, for each product kernel
this device has, for the cheapest padding rule under which a row's product is the same in every product the
verifier can make (every row count up to 64, then a spread up to 512: a verification step's sizes) at every
position. A rule pads a product of n rows to at least ``floor`` rows, rounded up to a multiple of ``group``.
The verifier's own product (``native``, ``sled_verifier.native``: one FMA chain per output in a fixed order)
is invariant by construction and holds with floor 1 wherever it builds, so it is listed and taken first; the
probe still checks it like the others. Torch's kernels, for a machine without it:

- ``floor`` alone (group 1): the kernel is the same for any n >= floor. oneDNN's inner product over a weight
  reordered once at load (``onednn``) is one on AVX-512 CPUs with floor 1 (2 for a 1536-wide input), and at a
  few rows it reads its weight about twice as fast as MKL's small-M GEMM, which re-packs the weight on every
  call (the vocabulary head at 1-5 rows: ~6 ms against 10-19 ms on a Zen 4 core). A floor that holds holds
  above it too, so oneDNN's products still get at least ``SPEED_FLOOR`` rows, for speed alone. MKL (``blas``)
  has floor 4 there with one thread.
- ``group`` (floor = group): every multiple of g rows agrees (MKL on two threads splits rows between them).

Where more than one kernel holds, the one that pads least at a step's small row counts is kept
(``least_padding``: deterministic, so a restarted verifier computes the same bits); only a shape with no rule
at all runs in fixed ``[tile, in]`` blocks as one batched product (invariant, but up to twice the time of one
large product at hundreds of rows on CPU). The
log line ``target_loaded`` says which (``batch_invariance``: e.g. ``onednn``, ``rows-of-4``,
``blas-from-4+onednn``, ``rows-of-4+tiles-8``, ``tiles-8``; ``off``). A linear whose weight no other module
shares keeps only its reordered copy (a tied vocabulary head keeps both: the embedding reads the plain one).

Measured bitwise on CPU by tests/test_invariance.py; on a GPU the probe decides, measured, not assumed.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sled_verifier import native

CPU_TILE = 8    # rows per block on CPU when no padding regime exists
CUDA_TILE = 64  # rows per block on a GPU: small enough to pad little, large enough to keep tensor cores fed
FLOORS = (1, 2, 4, 8)                # least rows per product the probe tries (any count above: no group)
GROUPS = (1, 2, 4, 8, 16, 32, 64)    # row groups the probe tries, smallest first
PROBE_ROWS = 512           # the largest product the probe checks (64 rows x 8 tokens)
PROBE_OUT = 4096           # the probe uses at most this many output features of a weight (a vocabulary head is big)
# A rule with a floor (and no group) holds for any larger floor too: padding changes no row's bits. Products of
# fewer rows are padded to this many for speed alone: oneDNN's 3-5 row kernel streams a weight faster than its
# 1-2 row one (SmolLM2's 1x1 step ~49 ms against ~57 with no padding, one Zen 4 core, medians of 7, twice).
SPEED_FLOOR = 4


@dataclass(frozen=True)
class Rule:
    """How one weight shape's products are made batch invariant: ``kernel`` (``blas``: ``F.linear``;
    ``onednn``: oneDNN's inner product over a weight reordered once), every product padded with zero rows to at
    least ``floor`` rows and a multiple of ``group``."""

    kernel: str
    floor: int
    group: int

    def rows(self, n: int) -> int:
        return -(-max(n, self.floor) // self.group) * self.group

    def label(self) -> str:
        if self.kernel == "blas":
            return f"rows-of-{self.group}" if self.group > 1 or self.floor == 1 else f"blas-from-{self.floor}"
        return (self.kernel + (f"-from-{self.floor}" if self.floor > 1 else "")
                + (f"-of-{self.group}" if self.group > 1 else ""))


def default_tile(device: torch.device) -> int:
    return CUDA_TILE if device.type == "cuda" else CPU_TILE


def kernels(device: torch.device) -> tuple[str, ...]:
    """The product kernels this device has, in order of preference: the verifier's own (``native``: a CPU with
    AVX2/FMA and a C compiler), oneDNN's reordered inner product on a CPU build with it, the BLAS."""
    cpu = device.type == "cpu"
    native_ok = cpu and native.available()
    onednn = cpu and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return ("native",) * native_ok + ("onednn",) * onednn + ("blas",)


def prepare(kernel: str, weight: torch.Tensor, weights: torch.dtype | None = None) -> torch.Tensor:
    """The weight as ``kernel`` reads it: packed in 64-output panels (in ``weights``' dtype: bfloat16 for a
    ``--dtype bfloat16`` target on a CPU, ``sled_verifier.native``), oneDNN's own layout (each a copy, made
    once), or the weight itself."""
    if kernel == "native":
        return native.pack(weight, weights or torch.float32)
    return torch.ops.mkldnn._reorder_linear_weight(weight, None) if kernel == "onednn" else weight


def product(kernel: str, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
    """``flat @ weight.T + bias`` by ``kernel``, ``weight`` as ``prepare`` made it: ``[T, in]`` -> ``[T, out]``."""
    if kernel == "native":
        return native.linear(flat, weight, bias, out_features)
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return F.linear(flat, weight, bias)


def ruled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rule: Rule,
                 out_features: int) -> torch.Tensor:
    """``x @ weight.T + bias`` over ``rule.rows(T)`` rows (zero rows added), so every row meets the same kernel."""
    features = x.shape[-1]
    flat = x.reshape(-1, features)                                                   # [T, in]
    rows = flat.shape[0]
    pad = rule.rows(rows) - rows
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, features)])
    out = product(rule.kernel, flat, weight, bias, out_features)
    return (out[:rows] if pad else out).reshape(*x.shape[:-1], out_features)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """``F.linear`` over a multiple of ``group`` rows (zero rows added), so no row ever meets an edge kernel."""
    return ruled_linear(x, weight, bias, Rule("blas", group, group), weight.shape[0])


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """``x @ weight.T + bias`` with every row computed by the same fixed-shape product."""
    features = x.shape[-1]
    flat = x.reshape(-1, features)                                                   # [T, in]
    rows = flat.shape[0]
    pad = (-rows) % tile
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, features)])
    blocks = flat.view(-1, tile, features)                                           # [T/tile, tile, in]
    out = torch.bmm(blocks, weight.t().expand(blocks.shape[0], -1, -1))              # [T/tile, tile, out]
    out = out.reshape(-1, weight.shape[0])[:rows]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def probe_tensors(in_features: int, out_features: int, has_bias: bool, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(min(out_features, PROBE_OUT), in_features, generator=generator).to(device, dtype)
    bias = torch.randn(weight.shape[0], generator=generator).to(device, dtype) if has_bias else None
    x = torch.randn(PROBE_ROWS, in_features, generator=generator).to(device, dtype)
    return x, weight, bias


def stable_rule(kernel: str, in_features: int, out_features: int, has_bias: bool, device: torch.device,
                dtype: torch.dtype, weights: torch.dtype | None = None) -> Rule | None:
    """The cheapest rule under which ``kernel`` gives every row the same bits in every product the verifier
    can make, wherever the row falls in it: the smallest floor in ``FLOORS`` with no group, else the smallest
    group in ``GROUPS``; None if there is none (or the kernel refuses this dtype)."""
    x, weight, bias = probe_tensors(in_features, out_features, has_bias, device, dtype)
    out = weight.shape[0]
    with torch.inference_mode():
        try:
            weight = prepare(kernel, weight, weights)
            product(kernel, x[:2], weight, bias, out)
        except RuntimeError:
            return None
        for rule in [*(Rule(kernel, f, 1) for f in FLOORS), *(Rule(kernel, g, g) for g in GROUPS[1:])]:
            if rule_holds(x, weight, bias, rule, out):
                return rule
    return None


def rule_holds(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rule: Rule, out: int) -> bool:
    """Whether each row of ``x`` gets the same bits in every product ``rule`` makes: against the product of all
    of x, every count up to 64 and a spread above, at the start of x and one row in (a row's position moves)."""
    reference = product(rule.kernel, x, weight, bias, out)                           # [rows, out]
    rows = x.shape[0]
    counts = sorted({rule.rows(n) for n in (*range(1, 65), 96, 128, 160, 192, 256, 320, 384, rows - 1)})
    for n in counts:
        for start in (0, 1):
            if start + n <= rows and not torch.equal(product(rule.kernel, x[start : start + n], weight, bias, out),
                                                     reference[start : start + n]):
                return False
    return True


def least_padding(rules: list[Rule]) -> Rule:
    """Of the rules that hold, the one that pads least at a step's small row counts (a lone token, one
    verification of 5, then 2-4 rows); ties go to the kernel listed first (``kernels``: native, oneDNN, the BLAS,
    since its reordered weight is read faster at few rows). Not timed at load: on a shared CPU a timing picked
    MKL for one shape in one load and oneDNN in the next (a different kernel, so different bits, after a
    restart), and a product timed alone keeps its weight in cache where a model's forward streams it."""
    return min(rules, key=lambda r: [r.rows(n) for n in (1, 5, 2, 3, 4)])


def regime(labels: list[str]) -> str:
    """How products are kept invariant, for the log: each shape's rule (``Rule.label``), or ``tiles-<n>``,
    joined: ``onednn``, ``rows-of-4``, ``rows-of-4+rows-of-16``, ``blas-from-4+onednn``, ``rows-of-4+tiles-8``."""
    return "+".join(sorted(set(labels)))


def make_batch_invariant(model: nn.Module, device: torch.device, mode: str = "auto",
                         weights: torch.dtype | None = None) -> str:
    """Route every ``nn.Linear`` of ``model`` through a batch-invariant product, each weight shape with its own
    probed rule; returns what was chosen (``regime``). ``mode``: auto (probe every kernel, keep the one that
    pads least), blas (probe the BLAS only), tiles (always blocks). ``weights=torch.bfloat16`` (a float32 model
    on a CPU whose native kernels have a bfloat16 product, ``native.bf16_products``): every product reads its
    weight packed in bfloat16 by the native kernel, the only one that takes it; ``RuntimeError`` if it cannot."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]  # subclasses (quantised) keep their kernels
    dtype = next(model.parameters()).dtype
    tile = default_tile(device)
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}

    def shape(m: nn.Linear) -> tuple[int, int, bool]:
        return m.in_features, m.out_features, m.bias is not None

    candidates = {"auto": kernels(device), "blas": ("blas",), "tiles": ()}[mode] if weights is None else ("native",)
    rules: dict[tuple, Rule | None] = {}
    for s in sorted({shape(m) for m in linears}):
        holding = [r for r in (stable_rule(k, *s, device, dtype, weights) for k in candidates) if r is not None]
        rule = least_padding(holding) if holding else None
        if rule is None and weights is not None:
            raise RuntimeError(f"no native {weights} product holds for a {s[0]} -> {s[1]} weight on this CPU")
        if rule is not None and rule.kernel == "onednn" and rule.group == 1:
            rule = Rule(rule.kernel, max(rule.floor, SPEED_FLOOR), 1)
        rules[s] = rule
    for module in linears:
        rule = rules[shape(module)]
        if rule is None:
            module.forward = types.MethodType(lambda self, x: tiled_linear(x, self.weight, self.bias, tile), module)
            continue
        weight = prepare(rule.kernel, module.weight.detach(), weights)
        route(module, rule, weight, keeps=rule.kernel != "blas" and id(module.weight) not in shared)
    return regime([r.label() if r is not None else f"tiles-{tile}" for r in rules.values()])


def route(module: nn.Linear, rule: Rule, weight: torch.Tensor, keeps: bool) -> None:
    """``module`` computes through ``rule`` over ``weight`` (as ``prepare`` made it), which it keeps as its
    parameter where ``keeps`` (no other module shares its weight: only the copy the kernel reads stays)."""
    if keeps:
        module.weight = nn.Parameter(weight, requires_grad=False)
    module.sled_rule, module.sled_weight = rule, weight
    module.forward = types.MethodType(
        lambda self, x, r=rule, w=weight: ruled_linear(x, w, self.bias, r, self.out_features), module)


def fuse_native(linears: list[nn.Linear]):
    """One native product for several linears of one input (a layer's q/k/v, its gate/up), or None where it cannot
    be: ``x -> [..., sum of their outputs]``, their outputs side by side. At the few rows of a verification step
    a product costs a fixed amount per call on top of its bytes (the transformers runtime ran 7 a layer where the
    compiled runtime, which fuses its weights at load, runs 4). The packed weights are panels of 64 outputs, so
    where every output count but the last is a multiple of 64 the fused weight is their panels end to end and
    each output's arithmetic is what its own product's was: the same bits. Each module then reads its share of
    the fused weight (a view: one copy in memory), so calling it alone gives those bits too."""
    rules = [getattr(m, "sled_rule", None) for m in linears]
    if any(r != Rule("native", 1, 1) for r in rules) or len({m.in_features for m in linears}) != 1:
        return None
    packed = [m.sled_weight for m in linears]
    biased = [m.bias is not None for m in linears]
    if len({p.dtype for p in packed}) != 1 or any(m.out_features % native.PANEL for m in linears[:-1]) \
            or any(biased) != all(biased):
        return None
    fused = torch.cat(packed)
    bias = torch.cat([m.bias.detach() for m in linears]) if all(biased) else None
    outputs, start = sum(m.out_features for m in linears), 0
    for module, weight in zip(linears, packed):
        keeps = module.weight.data_ptr() == weight.data_ptr()  # it kept the packed copy (no tied sharer)
        route(module, module.sled_rule, fused[start : start + weight.shape[0]], keeps)
        start += weight.shape[0]

    def product(x: torch.Tensor) -> torch.Tensor:
        return native.linear(x.reshape(-1, x.shape[-1]), fused, bias, outputs).reshape(*x.shape[:-1], outputs)

    return product
