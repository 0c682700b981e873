"""Slot attention over ragged rows, and the width-invariant form every position gets the same bits from.

A forward's rows are (slot, start, new tokens): each row's queries attend over its own slot in place, up to
its own length. Three forms:

- plain (``blocks=False``): one masked SDPA per row over its m queries. Cheap, but the kernel blocks its
  reduction over keys by the call's shape, so a position's bits depend on how many queries share its row
  (about 5e-5 between a 5-token verification and one-token decoding).
- blocks (width invariance, the default with batch invariance): the one formulation every attention call
  takes, one-token decoding included. Positions are cut into fixed blocks of ``QUERY_BLOCK`` (8) queries of
  the session's own context (position p is row p mod 8 of block p // 8), and each block attends over the
  keys up to its last position rounded up to ``KEY_BLOCK`` (64), the rest masked: the query count, the key
  count, the position's row in its block and its mask are functions of the position alone, whoever else is
  in the pass. Rows of a block that are not in this pass are fully masked (the kernel skips their softmax).
  Blocks of one row with the same key count are one SDPA call, stacked in its batch dimension over the
  slot's keys expanded (a view): the CPU kernel computes each (block, head) as its own task with the same
  code, so a block's bits do not depend on the batch it is stacked in. So a 2,048-token prefill is 32 calls
  per layer (one per 64 keys), a (k+1)-token verification one or two, decoding one.
- native (width invariance in float32 on the CPU where ``sled_verifier.native`` builds its kernels; the
  default there): ``csrc/attention.c``, one call per layer for all rows, in which each position's output is
  one fixed arithmetic over its own query and its slot's keys and values up to it (see that file), so it is
  width and batch invariant by construction, with no padded queries or keys: ~4x less work than the blocks
  at verification shapes. Its bits differ from the blocks' (another summation order), so one verifier
  process keeps one form; which one follows from the machine and the head size alone (``row_plan``).

Why 8 queries and an even key count (CPU flash kernel, fp32): each thread computes its tasks in a scratch
buffer of ``q_block * (kv_block + 2 + head_dim)`` floats laid end to end, and the BLAS's results depend on
that buffer's alignment. With 8 query rows and an even key block the buffer is a multiple of 64 bytes, so
every thread computes bitwise the same, and a task's bits do not depend on which thread runs it (with one
query per call they did: a decode's heads were split between threads by the call's size). tests/test_width.py
and tests/test_attention.py check it with ``torch.equal``; on another kernel (a GPU) it is a claim to measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sled_verifier import native

QUERY_BLOCK = 8   # queries per block: position p is row p % 8 of block p // 8
KEY_BLOCK = 64    # a block attends over its last position + 1 rounded up to this, the rest masked


def key_span(width: int) -> int:
    """Keys a block attends over when its last position is ``width - 1``: ``width`` rounded up to KEY_BLOCK.
    The KV store keeps every slot readable that far (``SlotKV.ensure_length``)."""
    return -(-width // KEY_BLOCK) * KEY_BLOCK


def block_groups(start: int, m: int, dtype: torch.dtype, device: torch.device) -> list[tuple]:
    """A row's queries (positions start .. start + m - 1) as groups of blocks with one key span each:
    (first query of the row, queries, key span, blocks, the row's offset in the first block, additive mask
    ``[blocks, 1, QUERY_BLOCK, span]``: 0 where a pass's position sees a key, -inf elsewhere)."""
    groups = []
    first_block, last_block = start // QUERY_BLOCK, (start + m - 1) // QUERY_BLOCK
    block = first_block
    while block <= last_block:
        span = key_span((block + 1) * QUERY_BLOCK)
        end_block = min(last_block, span // QUERY_BLOCK - 1)         # the blocks that share this key span
        blocks = end_block - block + 1
        low = max(start, block * QUERY_BLOCK)                         # the pass's positions in these blocks
        high = min(start + m, (end_block + 1) * QUERY_BLOCK)
        positions = block * QUERY_BLOCK + torch.arange(blocks * QUERY_BLOCK, device=device)  # of each block row
        in_pass = (positions >= low) & (positions < high)
        sees = (torch.arange(span, device=device)[None, :] <= positions[:, None]) & in_pass[:, None]
        mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, float("-inf"))
        groups.append((low - start, high - low, span, blocks, low - block * QUERY_BLOCK,
                       mask.view(blocks, 1, QUERY_BLOCK, span)))
        block = end_block + 1
    return groups


@dataclass(frozen=True)
class NativeRows:
    """The width-invariant form on the native kernel (``csrc/attention.c``): one call per layer for all rows."""
    table: torch.Tensor   # [B, 3] int64: slot, start, m
    longest: int          # the largest start + m

    def blocks(self, dtype: torch.dtype, device: torch.device) -> list:
        """The SDPA block plan of the same rows, for a head size the kernel does not serve."""
        return [(slot, start + m, m, None, block_groups(start, m, dtype, device)) for slot, start, m in self.table.tolist()]


def row_plan(slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]], device: torch.device,
             blocks: bool = False, dtype: torch.dtype = torch.float32) -> list | NativeRows:
    """Per row: (slot, width = start + m, m, causal mask of its m new tokens over its width or None, its block
    groups or None). Built once per forward; every layer reads it. The width-invariant form in float32 on the
    CPU takes the native kernel where this machine has one (``NativeRows``)."""
    if blocks and dtype == torch.float32 and device.type == "cpu" and native.available():
        table = torch.tensor([[int(slot), start, len(tokens)] for slot, start, tokens in zip(slots, starts, inputs)],
                             dtype=torch.int64)
        return NativeRows(table, max(start + len(tokens) for start, tokens in zip(starts, inputs)))
    plan = []
    for slot, start, tokens in zip(slots, starts, inputs):
        m = len(tokens)
        mask = None
        if m > 1 and not blocks:
            mask = torch.arange(start + m, device=device)[None, :] <= (start + torch.arange(m, device=device))[:, None]
        groups = block_groups(start, m, dtype, device) if blocks else None
        plan.append((int(slot), start + m, m, mask, groups))
    return plan


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows,
                scaling: float | None) -> torch.Tensor:
    """Each row's attention over its own slot, in place: ``query`` ``[B, H, M, D]``, ``key``/``value`` one
    layer's whole store ``[S+1, Hkv, L, D]``, ``rows`` from ``row_plan``. Returns ``[B, M, H, D]``; a row's
    result is computed exactly as if it were alone. Rows planned with blocks take the width-invariant form."""
    batch, heads, m_max, head_dim = query.shape
    if isinstance(rows, NativeRows):
        if native.attends(head_dim) and query.device.type == "cpu" and query.dtype == torch.float32:
            return native.attend(query, key, value, rows.table, rows.longest,
                                 scaling if scaling is not None else head_dim ** -0.5)
        rows = rows.blocks(query.dtype, query.device)
    out = query.new_zeros(batch, m_max, heads, head_dim)
    gqa = key.shape[1] != heads
    for row, (slot, width, m, mask, groups) in enumerate(rows):
        if groups is not None:
            for first, count, span, blocks, offset, block_mask in groups:
                if block_mask.device != query.device:  # layers spread over devices (device_map)
                    block_mask = block_mask.to(query.device)
                q = query.new_zeros(blocks * QUERY_BLOCK, heads, head_dim)
                q[offset : offset + count] = query[row, :, first : first + count].transpose(0, 1)
                q = q.view(blocks, QUERY_BLOCK, heads, head_dim).transpose(1, 2)         # [n, H, 8, D]
                attended = F.scaled_dot_product_attention(
                    q, key[slot : slot + 1, :, :span].expand(blocks, -1, -1, -1),
                    value[slot : slot + 1, :, :span].expand(blocks, -1, -1, -1),
                    attn_mask=block_mask, scale=scaling, enable_gqa=gqa)                    # [n, H, 8, D]
                attended = attended.transpose(1, 2).reshape(blocks * QUERY_BLOCK, heads, head_dim)
                out[row, first : first + count] = attended[offset : offset + count]
            continue
        if m == 1:
            attended = F.scaled_dot_product_attention(
                query[row : row + 1, :, :1], key[slot : slot + 1, :, :width], value[slot : slot + 1, :, :width],
                scale=scaling, enable_gqa=gqa)                                            # [1, H, 1, D]
            out[row, 0] = attended[0, :, 0]
            continue
        if mask.device != query.device:
            mask = mask.to(query.device)
        attended = F.scaled_dot_product_attention(
            query[row : row + 1, :, :m], key[slot : slot + 1, :, :width], value[slot : slot + 1, :, :width],
            attn_mask=mask, scale=scaling, enable_gqa=gqa)                                # [1, H, m, D]
        out[row, :m] = attended[0].transpose(0, 1)
    return out
