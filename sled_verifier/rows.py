"""Padded rows: a step's drafts, after the forward, as the tensors both verification paths read (it batches
nothing: the draft queue and the scheduler choose a step's drafts).

Ragged drafts become ``[B, K]`` right-padded with ``NO_TOKEN``, with each row's length k_i and length
budget. K is at least 1, so reductions over the draft axis always have width (a step of empty drafts verifies
the target's own next token). What only sampled rows need (warped p, proposals q', the round's uniforms) is
assembled beside the rejection test, in ``sled_verifier.sampling.sampled_rows``.

Pure: Python lists in, torch tensors out; no model, no session state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sled_protocol import Draft
from sled_verifier.verify import NO_TOKEN


@dataclass(frozen=True)
class PaddedRows:
    draft_ids: torch.Tensor   # [B, K] int64 draft tokens, right-padded with NO_TOKEN; K = max(1, longest k_i)
    lens: torch.Tensor        # [B] int64 k_i
    budgets: torch.Tensor     # [B] int64 tokens row i may still commit (max_len - n), >= 1

    @property
    def width(self) -> int:
        """K: the draft positions every row is padded to."""
        return self.draft_ids.shape[1]

    def take(self, rows: torch.Tensor) -> PaddedRows:
        """The batch of only ``rows`` (indices), padded as before: K stays the step's."""
        return PaddedRows(self.draft_ids[rows], self.lens[rows], self.budgets[rows])


def padded_rows(drafts: Sequence[Draft], budgets: Sequence[int], device: torch.device) -> PaddedRows:
    k_max = max(1, max(len(draft.tokens) for draft in drafts))
    padded = [[*draft.tokens] + [NO_TOKEN] * (k_max - len(draft.tokens)) for draft in drafts]
    return PaddedRows(
        draft_ids=torch.tensor(padded, dtype=torch.int64, device=device),                      # [B, K]
        lens=torch.tensor([len(draft.tokens) for draft in drafts], dtype=torch.int64, device=device),
        budgets=torch.tensor(list(budgets), dtype=torch.int64, device=device),
    )
