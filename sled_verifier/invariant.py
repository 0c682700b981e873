"""Batch invariance: a row's logits must not depend on which other rows share its forward.

Everything in a decoder is per token (embedding, norms, rotary, activations) or per row (slot attention reads
one row's slot over its own length), except the matrix products, whose kernel - and so its order of
summation - is chosen from the number of rows: on CPU a single row goes through a matrix-vector kernel and
gets logits ~1e-6 away from the same row inside a batch, enough to flip an argmax near a tie. The fix is to
never let the row count reach the kernel: ``invariant_linear`` multiplies in fixed ``[tile, in]`` blocks (one
batched product of identical shapes), so every row is reduced by the same kernel in the same order whatever
the batch. Padding to the tile is the only extra work (at most ``tile - 1`` rows per product).

Pure torch; measured bitwise on CPU fp32 by tests/test_invariance.py. On a GPU the same blocks make the
kernel choice fixed per block; whether cuBLAS then reduces each block identically is measured, not assumed.
"""

from __future__ import annotations

import types

import torch
from torch import nn

CPU_TILE = 8    # rows per block on CPU: as fast as one product here (MKL is weight-bound at these sizes)
CUDA_TILE = 64  # rows per block on a GPU: small enough to pad little, large enough to keep tensor cores fed


def default_tile(device: torch.device) -> int:
    return CUDA_TILE if device.type == "cuda" else CPU_TILE


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
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


def make_batch_invariant(model: nn.Module, tile: int) -> int:
    """Route every ``nn.Linear`` of ``model`` through ``invariant_linear``; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:  # subclasses (quantised layers) keep their own kernels
            module.forward = types.MethodType(
                lambda self, x: invariant_linear(x, self.weight, self.bias, tile), module)
            changed += 1
    return changed
