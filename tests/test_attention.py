"""The width-invariant attention alone (``sled_verifier.attention``), on random keys, values and queries.

A session decoded one position per call (each position's key written just before it attends, as the engine
does), the same positions in one prefill pass, and in verification passes of random widths 1-9 at random
starts beside another row: every position's output must be ``torch.equal`` across them, past the kernel's
512-key block too, at 1, 2 and 3 threads (the CPU kernel's per-thread scratch buffers are what made one-query
calls depend on their neighbours in a batch). The plain form (one masked SDPA per row) is what differs.
"""

from __future__ import annotations

import random
from itertools import accumulate

import pytest
import torch

from sled_verifier.attention import KEY_BLOCK, QUERY_BLOCK, attend_rows, block_groups, key_span, row_plan

HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 9, 3, 64, 560
CPU = torch.device("cpu")


def attend(keys, values, queries, rows, blocks: bool = True) -> torch.Tensor:
    """``attend_rows`` over rows (slot, start, m), each row's queries taken from ``queries[start:start + m]``."""
    m_max = max(m for _, _, m in rows)
    query = torch.zeros(len(rows), HEADS, m_max, HEAD_DIM)
    for r, (_, start, m) in enumerate(rows):
        query[r, :, :m] = queries[start : start + m].transpose(0, 1)
    plan = row_plan([s for s, _, _ in rows], [st for _, st, _ in rows], [[0] * m for _, _, m in rows], CPU, blocks)
    return attend_rows(query, keys, values, plan, HEAD_DIM ** -0.5)


@pytest.fixture(scope="module")
def session():
    generator = torch.Generator().manual_seed(21)
    room = key_span(POSITIONS)
    keys = torch.randn(3, KV_HEADS, room, HEAD_DIM, generator=generator)
    values = torch.randn(3, KV_HEADS, room, HEAD_DIM, generator=generator)
    return keys, values, torch.randn(POSITIONS, HEADS, HEAD_DIM, generator=generator)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_position_gets_the_bits_of_decoding_it_alone(session, threads):
    keys, values, queries = session
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Decoding: slot 1 starts empty (zeros) and each position's key and value are written before it attends.
        decode_keys, decode_values = torch.zeros_like(keys), torch.zeros_like(values)
        alone = []
        for p in range(POSITIONS):
            decode_keys[1, :, p], decode_values[1, :, p] = keys[1, :, p], values[1, :, p]
            alone.append(attend(decode_keys, decode_values, queries, [(1, p, 1)])[0, 0])
        alone = torch.stack(alone)
        assert torch.equal(attend(keys, values, queries, [(1, 0, POSITIONS)])[0, :POSITIONS], alone)
        rng = random.Random(threads)
        for _ in range(40):
            width = rng.randrange(1, 10)
            start = rng.randrange(0, POSITIONS - width)
            other = (2, rng.randrange(0, POSITIONS - 40), rng.randrange(1, 40))
            rows = [(1, start, width), other]
            rng.shuffle(rows)
            out = attend(keys, values, queries, rows)
            mine = [slot for slot, _, _ in rows].index(1)
            assert torch.equal(out[mine, :width], alone[start : start + width]), (threads, start, width)
    finally:
        torch.set_num_threads(before)


def test_one_masked_call_per_row_is_not_width_invariant(session):
    keys, values, queries = session
    alone = torch.stack([attend(keys, values, queries, [(1, p, 1)], blocks=False)[0, 0] for p in range(100, 140)])
    together = attend(keys, values, queries, [(1, 100, 40)], blocks=False)[0]
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
