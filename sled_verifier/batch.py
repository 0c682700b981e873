"""Batch assembly: a step's drafts as the padded tensors the verification maths reads.

Ragged drafts become ``[B, K]`` right-padded with ``NO_TOKEN``, with each row's length k_i and length
budget; sampled rows also need their warping settings, their sparse proposals q' (``[R, K, M]``) and the
uniforms their accept/reject tests and next-token draw consume (``[R, K+1]``, from the round's seed, so a
verdict is the same on every verifier and in every batch). K is at least 1, so reductions over the draft
axis always have width (a step of empty drafts verifies the target's own next token).

Pure: Python lists in, torch tensors out; no model, no session state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sled_protocol import Draft
from sled_protocol.seeding import STREAM_VERIFY, round_seed
from sled_verifier.verify import NO_TOKEN


@dataclass(frozen=True)
class DraftBatch:
    draft_ids: torch.Tensor   # [B, K] int64 draft tokens, right-padded with NO_TOKEN; K = max(1, longest k_i)
    lens: torch.Tensor        # [B] int64 k_i
    budgets: torch.Tensor     # [B] int64 tokens row i may still commit (max_len - n), >= 1

    @property
    def width(self) -> int:
        """K: the draft positions every row is padded to."""
        return self.draft_ids.shape[1]

    def take(self, rows: torch.Tensor) -> DraftBatch:
        """The batch of only ``rows`` (indices), padded as before: K stays the step's."""
        return DraftBatch(self.draft_ids[rows], self.lens[rows], self.budgets[rows])


def draft_batch(drafts: Sequence[Draft], budgets: Sequence[int], device: torch.device) -> DraftBatch:
    k_max = max(1, max(len(draft.tokens) for draft in drafts))
    padded = [[*draft.tokens] + [NO_TOKEN] * (k_max - len(draft.tokens)) for draft in drafts]
    return DraftBatch(
        draft_ids=torch.tensor(padded, dtype=torch.int64, device=device),                      # [B, K]
        lens=torch.tensor([len(draft.tokens) for draft in drafts], dtype=torch.int64, device=device),
        budgets=torch.tensor(list(budgets), dtype=torch.int64, device=device),
    )


@dataclass(frozen=True)
class SamplingInputs:
    """What rejection sampling needs beyond the draft tokens, for the sampled rows only."""

    temperature: torch.Tensor  # [R] float
    top_k: torch.Tensor        # [R] int, 0: off
    top_p: torch.Tensor        # [R] float, 1: off
    q_ids: torch.Tensor        # [R, K, M] int64 sparse proposal ids (padding: id 0 with probability 0)
    q_probs: torch.Tensor      # [R, K, M] float64 q', each real row summing to 1
    uniforms: torch.Tensor     # [R, K+1] float64 U[0, 1): column j tests d_{j+1}, column k_i draws the next token


def sampling_inputs(drafts: Sequence[Draft], k_max: int, device: torch.device) -> SamplingInputs:
    """``drafts`` are sampled (each has ``sampling``); ``k_max`` is the batch's K."""
    temperature, top_k, top_p = (torch.tensor([getattr(d.sampling, name) for d in drafts], device=device)
                                 for name in ("temperature", "top_k", "top_p"))
    q_ids, q_probs = sparse_proposals(drafts, k_max)
    return SamplingInputs(temperature, top_k, top_p, q_ids.to(device), q_probs.to(device),
                          verify_uniforms(drafts, k_max).to(device))


def sparse_proposals(drafts: Sequence[Draft], k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded sparse proposals ``[R, K, M]``; q' = the sent float32 values over their sum (as the edge
    sampled); a draft without one is the point mass on its token (token-only rule)."""
    m = max((len(row) for d in drafts if d.q_ids for row in d.q_ids), default=1)
    no_row = ([0] * m, [0.0] * m)
    id_rows, prob_rows = [], []
    for draft in drafts:
        if draft.q_ids is None:  # point mass: q'(d_j) = 1
            rows = [([t] + [0] * (m - 1), [1.0] + [0.0] * (m - 1)) for t in draft.tokens]
        else:
            rows = [(list(i) + [0] * (m - len(i)), list(q) + [0.0] * (m - len(q)))
                    for i, q in zip(draft.q_ids, draft.q_probs)]
        rows += [no_row] * (k_max - len(rows))
        id_rows.append([row[0] for row in rows])
        prob_rows.append([row[1] for row in rows])
    ids = torch.tensor(id_rows, dtype=torch.int64)                                  # [R, K, M]
    probs = torch.tensor(prob_rows, dtype=torch.float32).double()                   # [R, K, M]
    return ids, probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-300)


def verify_uniforms(drafts: Sequence[Draft], k_max: int) -> torch.Tensor:
    """``[R, K+1]`` float64 uniforms of each draft's verification stream, seeded by its session and round."""
    return torch.stack([
        torch.rand(k_max + 1, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(round_seed(d.sampling.seed, d.base_len, STREAM_VERIFY)))
        for d in drafts
    ])
