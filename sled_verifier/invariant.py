"""Batch invariance: a row's logits must not depend on which other rows share its forward.

Everything in a decoder is per token (embedding, norms, rotary, activations) or per row (slot attention reads
one row's slot over its own length), except the matrix products, whose kernel - and so its order of
summation - depends on the row count and on where a row falls in it. On this CPU (MKL) a lone row goes
through a matrix-vector kernel, and rows past the last full group of 4 through an edge kernel: a one-token
row's logits are ~1e-6 away from the same row inside a batch, enough to flip an argmax near a tie. When the
row count is a multiple of 4, every row comes out bitwise the same whatever the count and its position
(checked up to 1100 rows, 1 and 2 threads, every shape of the family).

So at load ``make_batch_invariant`` probes each distinct weight shape of the model on its device for the
smallest row group g (1, 2, 4, 8 or 16) such that a row's product is the same in every product of a multiple
of g rows at any position, and pads every product to a multiple of g (at most g - 1 zero rows: free). If no
such group exists (another BLAS, another GPU), every product runs in fixed ``[tile, in]`` blocks as one
batched product: always invariant, but up to twice the time of one large product at hundreds of rows on CPU.
The log line ``target_loaded`` says which (``batch_invariance``: ``rows-of-4``, ``tiles-8``, ``off``).

Measured bitwise on CPU fp32 by tests/test_invariance.py; on a GPU the probe decides, measured, not assumed.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CPU_TILE = 8    # rows per block on CPU when no padding regime exists
CUDA_TILE = 64  # rows per block on a GPU: small enough to pad little, large enough to keep tensor cores fed
GROUPS = (1, 2, 4, 8, 16)  # row groups the probe tries, smallest first
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
    """The smallest row group g such that a row's product is bitwise the same in products of every multiple of
    g rows (up to 64, then 128 and 256) at every probed position; None if no group in ``GROUPS`` is."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(min(out_features, PROBE_OUT), in_features, generator=generator).to(device, dtype)
    bias = torch.randn(weight.shape[0], generator=generator).to(device, dtype) if has_bias else None
    x = torch.randn(256, in_features, generator=generator).to(device, dtype)
    with torch.inference_mode():
        for group in GROUPS:
            reference = F.linear(x[:1].expand(group, -1).contiguous(), weight, bias)[0]
            counts = [*range(group, 65, group), 128, 256]

            def same(rows: int, position: int) -> bool:
                placed = torch.cat([x[1 : position + 1], x[:1], x[position + 1 : rows]])  # row 0 at ``position``
                return torch.equal(F.linear(placed, weight, bias)[position], reference)

            if all(same(n, p) for n in counts for p in sorted({0, group - 1, n // 2, n - group, n - 1})):
                return group
    return None


def make_batch_invariant(model: nn.Module, device: torch.device, mode: str = "auto") -> str:
    """Route every ``nn.Linear`` of ``model`` through a batch-invariant product; returns what was chosen:
    ``rows-of-<g>`` (products padded to a multiple of g rows) or ``tiles-<n>``. ``mode``: auto (probe; pad
    when a group exists), tiles (always blocks)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]  # subclasses (quantised) keep their kernels
    dtype = next(model.parameters()).dtype
    shapes = {(m.in_features, m.out_features, m.bias is not None) for m in linears}
    groups = [stable_group(*shape, device, dtype) for shape in sorted(shapes)] if mode == "auto" else [None]
    if groups and all(g is not None for g in groups):
        group = max(groups)  # groups are powers of two: a multiple of the largest is a multiple of each
        product, choice = (lambda self, x: padded_linear(x, self.weight, self.bias, group)), f"rows-of-{group}"
    else:
        tile = default_tile(device)
        product, choice = (lambda self, x: tiled_linear(x, self.weight, self.bias, tile)), f"tiles-{tile}"
    for module in linears:
        module.forward = types.MethodType(product, module)
    return choice
