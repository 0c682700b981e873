"""Batch invariance: a row's logits must not depend on which other rows share its forward.

Everything in a decoder is per token (embedding, norms, rotary, activations) or per row (slot attention reads
one row's slot over its own length), except the matrix products, whose kernel - and so its order of
summation - depends on the row count and on where a row falls in it. On this CPU (MKL) a lone row goes
through a matrix-vector kernel, and rows past the last full group of 4 through an edge kernel: a one-token
row's logits are ~1e-6 away from the same row inside a batch, enough to flip an argmax near a tie. When the
row count is a multiple of 4, every row comes out bitwise the same whatever the count and its position
(checked up to 1100 rows, 1 and 2 threads, every shape of the family).

So at load ``make_batch_invariant`` probes each distinct weight shape of the model on its device for the
smallest row group g (1, 2, 4, ... 64) such that a row's product is the same in every product of a multiple
of g rows (every multiple up to 64, then up to 512: a verification step's sizes) at every position, and pads
each product to a multiple of its own shape's group (at most g - 1 zero rows). One shape that needs a larger
group (a BLAS that splits rows between threads, say) costs only its own products, and only a shape with no
group at all runs in fixed ``[tile, in]`` blocks as one batched product (invariant, but up to twice the time
of one large product at hundreds of rows on CPU); the other shapes keep their padding. The log line
``target_loaded`` says which (``batch_invariance``: ``rows-of-4``; ``rows-of-4+16`` when shapes differ;
``rows-of-4+tiles-8`` when some shape has no group; ``tiles-8``; ``off``).

Measured bitwise on CPU fp32 by tests/test_invariance.py; on a GPU the probe decides, measured, not assumed.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CPU_TILE = 8    # rows per block on CPU when no padding regime exists
CUDA_TILE = 64  # rows per block on a GPU: small enough to pad little, large enough to keep tensor cores fed
GROUPS = (1, 2, 4, 8, 16, 32, 64)  # row groups the probe tries, smallest first
PROBE_ROWS = 512           # the largest product the probe checks (64 rows x 8 tokens)
PROBE_OUT = 4096           # the probe uses at most this many output features of a weight (a vocabulary head is big)


def default_tile(device: torch.device) -> int:
    return CUDA_TILE if device.type == "cuda" else CPU_TILE


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """``F.linear`` over a multiple of ``group`` rows (zero rows added), so no row ever meets an edge kernel."""
    features = x.shape[-1]
    flat = x.reshape(-1, features)
    rows = flat.shape[0]
    pad = (-rows) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, features)])
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


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


def stable_group(in_features: int, out_features: int, has_bias: bool, device: torch.device,
                 dtype: torch.dtype) -> int | None:
    """The smallest row group g in ``GROUPS`` such that every row's product is bitwise the same in products of
    every multiple of g rows up to 64 and a spread of larger ones up to ``PROBE_ROWS``, wherever it falls in
    them; None if there is none."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(min(out_features, PROBE_OUT), in_features, generator=generator).to(device, dtype)
    bias = torch.randn(weight.shape[0], generator=generator).to(device, dtype) if has_bias else None
    x = torch.randn(PROBE_ROWS, in_features, generator=generator).to(device, dtype)
    with torch.inference_mode():
        for group in GROUPS:
            if row_invariant(x, weight, bias, group):
                return group
    return None


def row_invariant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> bool:
    """Whether each row of ``x`` gets the same bits in every product of a multiple of ``group`` rows: the
    reference computes every row in a product of exactly ``group`` rows, at two positions in it (chunks of x,
    and chunks of x shifted by one row); each probed product of n rows must give every row those bits."""
    rows = x.shape[0]
    chunks = torch.cat([F.linear(x[i : i + group], weight, bias) for i in range(0, rows, group)])   # [rows, out]
    shifted = torch.roll(x, 1, 0)
    moved = torch.cat([F.linear(shifted[i : i + group], weight, bias) for i in range(0, rows, group)])
    if not torch.equal(torch.roll(moved, -1, 0), chunks):
        return False
    counts = [*range(group, 65, group), *(n for n in (96, 128, 160, 192, 256, 320, 384, rows) if n % group == 0)]
    return all(torch.equal(F.linear(x[:n], weight, bias), chunks[:n]) for n in counts)


def regime(groups: list[int | None], tile: int) -> str:
    """How products are kept invariant, for the log: ``rows-of-4``, ``rows-of-4+16``, ``rows-of-4+tiles-8``,
    ``tiles-8``."""
    sizes = "+".join(str(g) for g in sorted({g for g in groups if g is not None}))
    tiles = f"tiles-{tile}" if None in groups else ""
    return "+".join(part for part in (f"rows-of-{sizes}" if sizes else "", tiles) if part)


def make_batch_invariant(model: nn.Module, device: torch.device, mode: str = "auto") -> str:
    """Route every ``nn.Linear`` of ``model`` through a batch-invariant product, each weight shape with its own
    probed group; returns what was chosen (``regime``). ``mode``: auto (probe; pad where a group exists),
    tiles (always blocks)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]  # subclasses (quantised) keep their kernels
    dtype = next(model.parameters()).dtype
    tile = default_tile(device)

    def shape(m: nn.Linear) -> tuple[int, int, bool]:
        return m.in_features, m.out_features, m.bias is not None

    shapes = sorted({shape(m) for m in linears})
    groups = {s: stable_group(*s, device, dtype) if mode == "auto" else None for s in shapes}
    for module in linears:
        group = groups[shape(module)]
        if group is not None:
            module.forward = types.MethodType(lambda self, x, g=group: padded_linear(x, self.weight, self.bias, g), module)
        else:
            module.forward = types.MethodType(lambda self, x: tiled_linear(x, self.weight, self.bias, tile), module)
    return regime(list(groups.values()), tile)
