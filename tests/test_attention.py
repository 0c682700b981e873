"""The width-invariant attention alone (``sled_verifier.attention``), on random keys, values and queries.

A session decoded one position per call (each position's key written just before it attends, as the engine
does), the same positions in one prefill pass, and in verification passes of random widths 1-9 at random
starts beside another row: every position's output must be ``torch.equal`` across them, past the kernel's
512-key block too, at 1, 2 and 3 threads (the CPU kernel's per-thread scratch buffers are what made one-query
calls depend on their neighbours in a batch). Both width-invariant forms: the native kernel
(``csrc/attention.c``, where this machine builds it) and the SDPA blocks (everywhere else). The native one also
against plain masked SDPA, over a prefill cut in random pieces beside other rows, a long context, GQA and not.
The plain form (one masked SDPA per row) is what differs.
"""

from __future__ import annotations

import random
from itertools import accumulate

import pytest
import torch

from sled_verifier import native
from sled_verifier.attention import (KEY_BLOCK, QUERY_BLOCK, NativeRows, attend_rows, block_groups, key_span,
                                     row_plan)

HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 9, 3, 64, 560
CPU = torch.device("cpu")
FORMS = ["blocks", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="no native kernels on this machine (no cc or no AVX2/FMA)"))]


def attend(keys, values, queries, rows, form: str = "blocks") -> torch.Tensor:
    """``attend_rows`` over rows (slot, start, m), each row's queries taken from ``queries[start:start + m]``,
    in one form: plain, blocks (SDPA) or native (``row_plan``'s choice where the kernel is built)."""
    m_max = max(m for _, _, m in rows)
    heads, head_dim = queries.shape[1:]
    query = torch.zeros(len(rows), heads, m_max, head_dim)
    for r, (_, start, m) in enumerate(rows):
        query[r, :, :m] = queries[start : start + m].transpose(0, 1)
    plan = row_plan([s for s, _, _ in rows], [st for _, st, _ in rows], [[0] * m for _, _, m in rows], CPU,
                    form != "plain")
    if form == "native":
        assert isinstance(plan, NativeRows)
    elif isinstance(plan, NativeRows):  # the SDPA blocks of the same rows
        plan = plan.blocks(torch.float32, CPU)
    return attend_rows(query, keys, values, plan, head_dim ** -0.5)


@pytest.fixture(scope="module")
def session():
    generator = torch.Generator().manual_seed(21)
    room = key_span(POSITIONS)
    keys = torch.randn(3, KV_HEADS, room, HEAD_DIM, generator=generator)
    values = torch.randn(3, KV_HEADS, room, HEAD_DIM, generator=generator)
    return keys, values, torch.randn(POSITIONS, HEADS, HEAD_DIM, generator=generator)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_position_gets_the_bits_of_decoding_it_alone(session, threads, form):
    keys, values, queries = session
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Decoding: slot 1 starts empty (zeros) and each position's key and value are written before it attends.
        decode_keys, decode_values = torch.zeros_like(keys), torch.zeros_like(values)
        alone = []
        for p in range(POSITIONS):
            decode_keys[1, :, p], decode_values[1, :, p] = keys[1, :, p], values[1, :, p]
            alone.append(attend(decode_keys, decode_values, queries, [(1, p, 1)], form)[0, 0])
        alone = torch.stack(alone)
        assert torch.equal(attend(keys, values, queries, [(1, 0, POSITIONS)], form)[0, :POSITIONS], alone)
        rng = random.Random(threads)
        for _ in range(40):
            width = rng.randrange(1, 10)
            start = rng.randrange(0, POSITIONS - width)
            other = (2, rng.randrange(0, POSITIONS - 40), rng.randrange(1, 40))
            rows = [(1, start, width), other]
            rng.shuffle(rows)
            out = attend(keys, values, queries, rows, form)
            mine = [slot for slot, _, _ in rows].index(1)
            assert torch.equal(out[mine, :width], alone[start : start + width]), (threads, start, width)
    finally:
        torch.set_num_threads(before)


def test_one_masked_call_per_row_is_not_width_invariant(session):
    keys, values, queries = session
    alone = torch.stack([attend(keys, values, queries, [(1, p, 1)], "plain")[0, 0] for p in range(100, 140)])
    together = attend(keys, values, queries, [(1, 100, 40)], "plain")[0]
    assert not torch.equal(together, alone)
    assert torch.allclose(together, alone, atol=1e-4)


def test_blocks_cover_a_row_once_with_spans_that_follow_from_positions():
    for start, m in [(0, 1), (0, 64), (5, 9), (60, 9), (127, 2), (100, 300), (511, 3)]:
        groups = block_groups(start, m, torch.float32, CPU)
        assert sum(count for _, count, *_ in groups) == m
        assert [first for first, *_ in groups] == [0, *accumulate(count for _, count, *_ in groups[:-1])]
        for first, count, span, blocks, offset, mask in groups:
            position = start + first
            assert span == key_span((position // QUERY_BLOCK + 1) * QUERY_BLOCK) and span % KEY_BLOCK == 0
            assert offset == position % QUERY_BLOCK and mask.shape == (blocks, 1, QUERY_BLOCK, span)
            rows = mask.view(blocks * QUERY_BLOCK, span)
            assert torch.isinf(rows[:offset]).all() and torch.isinf(rows[offset + count :]).all()
            for j in range(count):  # a pass's position sees exactly the keys up to itself
                visible = (rows[offset + j] == 0).nonzero().flatten().tolist()
                assert visible == list(range(position + j + 1))


def masked_sdpa(keys, values, queries, slot: int) -> torch.Tensor:
    """Plain causal SDPA of every position of ``queries`` over ``slot``: ``[P, H, D]``, the float reference."""
    positions = queries.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        queries.transpose(0, 1)[None], keys[slot : slot + 1, :, :positions], values[slot : slot + 1, :, :positions],
        is_causal=True, scale=queries.shape[-1] ** -0.5,
        enable_gqa=keys.shape[1] != queries.shape[1])[0].transpose(0, 1)


@pytest.mark.skipif(not native.available(), reason="no native kernels on this machine (no cc or no AVX2/FMA)")
@pytest.mark.parametrize("heads, kv_heads, head_dim, positions", [(9, 3, 64, 1100), (4, 4, 16, 300), (2, 1, 128, 77)])
def test_the_native_form_is_attention_and_gives_a_position_its_bits_however_its_session_was_cut(
        heads, kv_heads, head_dim, positions):
    """A context no block divides, GQA and not, the tiny target's head size: the native kernel is causal SDPA to
    float tolerance, and every position's bits are the same in the whole prefill, in a prefill cut in random
    pieces each beside other rows (prefill and decoding neighbours), and in one-token decoding."""
    generator = torch.Generator().manual_seed(positions)
    keys = torch.randn(4, kv_heads, key_span(positions), head_dim, generator=generator)
    values = torch.randn(4, kv_heads, key_span(positions), head_dim, generator=generator)
    queries = torch.randn(positions, heads, head_dim, generator=generator)
    whole = attend(keys, values, queries, [(2, 0, positions)], "native")[0]
    assert torch.allclose(whole, masked_sdpa(keys, values, queries, 2), atol=1e-5, rtol=1e-4)
    rng = random.Random(positions)
    cuts = sorted(rng.sample(range(1, positions), 12))
    for begin, end in zip([0, *cuts], [*cuts, positions]):
        rows = [(2, begin, end - begin), (0, rng.randrange(positions - 40), rng.randrange(1, 40)),
                (3, rng.randrange(positions - 1), 1)]
        rng.shuffle(rows)
        out = attend(keys, values, queries, rows, "native")
        mine = [slot for slot, _, _ in rows].index(2)
        assert torch.equal(out[mine, : end - begin], whole[begin:end]), (begin, end)
    for p in rng.sample(range(positions), 25):
        assert torch.equal(attend(keys, values, queries, [(2, p, 1)], "native")[0, 0], whole[p]), p


@pytest.mark.skipif(not native.available(), reason="no native kernels on this machine (no cc or no AVX2/FMA)")
def test_a_head_size_the_kernel_does_not_serve_keeps_the_sdpa_blocks():
    """24 floats a head is no whole number of vectors: the native plan falls back to the SDPA blocks' bits."""
    generator = torch.Generator().manual_seed(24)
    keys, values = torch.randn(2, 2, 64, 24, generator=generator), torch.randn(2, 2, 64, 24, generator=generator)
    queries = torch.randn(40, 4, 24, generator=generator)
    out = attend(keys, values, queries, [(1, 0, 40)], "native")
    assert torch.equal(out, attend(keys, values, queries, [(1, 0, 40)], "blocks"))
    assert torch.allclose(out[0], masked_sdpa(keys, values, queries, 1), atol=1e-5, rtol=1e-4)
