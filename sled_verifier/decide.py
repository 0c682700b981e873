"""Decide a verified batch: greedy rows by argmax, sampled rows by rejection sampling; each row by exactly one.

As vLLM's rejection sampler keeps them, the two paths are apart: a greedy row (temperature 0) is decided by
``verify.greedy_verify`` on the target's argmax, a sampled row by ``sampling.rejection_sample`` on the
warped target distribution p and the draft's proposal q'. A batch of only greedy rows (the common case)
never touches sampling code: no warping, no proposals, no uniforms. A mixed batch runs each path on its
own rows and scatters the two results back into batch order.

Pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sled_protocol import Draft
from sled_verifier import sampling
from sled_verifier.rows import PaddedRows, padded_rows
from sled_verifier.verify import VerifyResult, greedy_verify


def is_sampled(draft: Draft) -> bool:
    """A sampled row: sampling settings with a temperature above 0 (no settings, or temperature 0: greedy)."""
    return draft.sampling is not None and not draft.sampling.greedy


def decide(drafts: Sequence[Draft], budgets: Sequence[int], logits, eos_ids: torch.Tensor) -> VerifyResult:
    """``logits`` [B, >=K+1, V]: the target's scores of each row's ``[x[n-1], d_1..d_k]``, a tensor or a packed
    forward's ``target.PackedLogits`` (greedy rows then take each token's argmax, with no padded copy; sampled
    rows are copied out alone); ``budgets`` [B]: tokens each session may still commit; ``eos_ids`` [E]. One
    result row per draft, in order."""
    batch = padded_rows(drafts, budgets, logits.device)
    sampled = [row for row, draft in enumerate(drafts) if is_sampled(draft)]
    if not sampled:
        return decide_greedy(batch, logits.argmax(dim=-1), eos_ids)
    if len(sampled) == len(drafts):
        return decide_sampled(batch, drafts, logits, eos_ids)
    greedy = [row for row, draft in enumerate(drafts) if not is_sampled(draft)]
    greedy_rows, sampled_rows = (torch.tensor(rows, device=logits.device) for rows in (greedy, sampled))
    # The argmax of every row, then the greedy rows' [G, K+1]: indexing the logits first would copy [G, K+1, V].
    target_ids = logits.argmax(dim=-1)[greedy_rows]
    return scatter(len(drafts), [
        (greedy_rows, decide_greedy(batch.take(greedy_rows), target_ids, eos_ids)),
        (sampled_rows, decide_sampled(batch.take(sampled_rows), [drafts[row] for row in sampled],
                                      logits[sampled_rows], eos_ids)),
    ])


def decide_greedy(batch: PaddedRows, target_ids: torch.Tensor, eos_ids: torch.Tensor) -> VerifyResult:
    """Greedy rows: accept the longest prefix matching the target's argmax ``target_ids`` [B, K+1]."""
    return greedy_verify(batch.draft_ids, batch.lens, target_ids, batch.budgets, eos_ids)


def decide_sampled(batch: PaddedRows, drafts: Sequence[Draft], logits: torch.Tensor,
                   eos_ids: torch.Tensor) -> VerifyResult:
    """Sampled rows: p = the target's logits warped by each session's settings, tested against its q'."""
    return sampling.rejection_sample(sampling.sampled_rows(batch, drafts, logits), eos_ids)


def scatter(size: int, parts: Sequence[tuple[torch.Tensor, VerifyResult]]) -> VerifyResult:
    """One result of ``size`` rows from results of disjoint row sets (``rows`` indices, that set's result)."""
    assert sum(len(rows) for rows, _ in parts) == size, "every row decided by exactly one part"
    fields = {}
    for name in ("accepted", "next_token", "is_bonus", "hit_eos"):
        first = getattr(parts[0][1], name)
        merged = first.new_empty(size)
        for rows, part in parts:
            merged[rows] = getattr(part, name)
        fields[name] = merged
    return VerifyResult(**fields)
