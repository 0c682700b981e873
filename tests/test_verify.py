"""Greedy verification on hand-built target argmaxes (no model), one case per rule."""

from __future__ import annotations

import pytest
import torch

from sled_verifier.verify import NO_TOKEN, greedy_verify

EOS = 0


def run(drafts: list[list[int]], targets: list[list[int]], budgets: list[int], lens: list[int] | None = None):
    """Pad like the engine does (NO_TOKEN after each draft, target rows to K+1) and verify; ``lens`` overrides k_i."""
    k_max = max((len(d) for d in drafts), default=0)
    draft_ids = torch.tensor([d + [NO_TOKEN] * (k_max - len(d)) for d in drafts], dtype=torch.int64).reshape(len(drafts), k_max)
    target_ids = torch.tensor([t + [99] * (k_max + 1 - len(t)) for t in targets], dtype=torch.int64)
    lens = lens if lens is not None else [len(d) for d in drafts]
    result = greedy_verify(draft_ids, torch.tensor(lens), target_ids, torch.tensor(budgets), torch.tensor([EOS]))
    return [(a, n, b, e) for a, n, b, e in zip(result.accepted.tolist(), result.next_token.tolist(),
                                                 result.is_bonus.tolist(), result.hit_eos.tolist())]


CASES = [
    # name, draft, target argmax after [x[n-1], d1..dk], budget, (accepted, next, is_bonus, hit_eos)
    ("full match, bonus", [5, 6, 7], [5, 6, 7, 8], 10, (3, 8, True, False)),
    ("early mismatch, recovered", [5, 6, 7], [5, 9, 7, 8], 10, (1, 9, False, False)),
    ("first token wrong", [5, 6, 7], [4, 6, 7, 8], 10, (0, 4, False, False)),
    ("empty draft: the target's own next token", [], [4], 10, (0, 4, True, False)),
    ("accepted EOS ends the session, no bonus", [5, EOS, 7], [5, EOS, 7, 8], 10, (2, NO_TOKEN, False, True)),
    ("recovered EOS", [5, 6], [5, EOS, 3], 10, (1, EOS, False, True)),
    ("bonus EOS", [5, 6], [5, 6, EOS], 10, (2, EOS, True, True)),
    ("budget ends inside the draft: no next token", [5, 6, 7], [5, 6, 7, 8], 2, (2, NO_TOKEN, False, False)),
    ("budget ends at the last draft token: no bonus", [5, 6, 7], [5, 6, 7, 8], 3, (3, NO_TOKEN, False, False)),
    ("budget leaves room for exactly the bonus", [5, 6, 7], [5, 6, 7, 8], 4, (3, 8, True, False)),
    ("match after a mismatch does not count", [5, 6, 7], [5, 1, 7, 8], 10, (1, 1, False, False)),
]


@pytest.mark.parametrize(("name", "draft", "target", "budget", "expected"), CASES, ids=[c[0] for c in CASES])
def test_single_session_rules(name, draft, target, budget, expected):
    assert run([draft], [target], [budget]) == [expected]


def test_ragged_batch_equals_each_session_alone():
    """Different k per row, padded: each row's verdict is the one it gets alone."""
    rows = [(draft, target, budget) for _, draft, target, budget, _ in CASES]
    batched = run([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    assert batched == [expected for *_, expected in CASES]


def test_positions_past_the_draft_length_never_count():
    """Padding that happens to equal the target's tokens is still padding: k_i = 1 accepts one token."""
    assert run([[5, 6, 7]], [[5, 6, 7, 8]], [10], lens=[1]) == [(1, 6, True, False)]
