"""Exact speculative sampling against a sparse draft proposal (Leviathan et al. 2023, arXiv 2211.17192;
Chen et al. 2023, arXiv 2302.01318), vectorised over a padded ragged batch.

p = the target's distribution after the session's temperature / top-k / top-p; q' = the sparse proposal
the edge really sampled d_i from (its top-m, renormalised), sent with the draft. For each position:
accept d_i with probability min(1, p_i(d_i) / q'_i(d_i)) (q'_i(d_i) = 0 is a rejection); at the first
rejection the recovered token is drawn from norm(max(0, p_i - q'_i)); after k accepted, the bonus token
is drawn from p_{k+1}. A draft without a proposal is a point mass q' = delta(d_i), which gives the
token-only rule: accept with p(d_i), else draw from p with d_i removed. Both keep the output distributed
exactly as the target's own sampling.

The whole sampled path reads top to bottom here, gpt-fast style: ``sampled_rows`` assembles what the test needs
for a batch of sampled rows (p warped by each row's settings, the padded proposals q', the round's uniforms) into
one ``SampledRows``, and ``rejection_sample`` decides them (accept, then the residual or bonus draw). Greedy rows
never come here (``sled_verifier.decide``, ``sled_verifier.verify``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sled_protocol import Draft
from sled_protocol.seeding import STREAM_VERIFY, round_seed
from sled_verifier.rows import PaddedRows
from sled_verifier.verify import VerifyResult, apply_stops


@dataclass(frozen=True)
class SampledRows:
    """Everything rejection sampling reads for R sampled rows padded to K draft positions (``sampled_rows``)."""

    probs: torch.Tensor       # [R, K+1, V] target p after warping; row j scores the token after d_1..d_j
    draft_ids: torch.Tensor   # [R, K] draft tokens, right-padded with verify.NO_TOKEN
    draft_lens: torch.Tensor  # [R] k_i
    q_ids: torch.Tensor       # [R, K, M] sparse proposal ids (padding: any id with probability 0)
    q_probs: torch.Tensor     # [R, K, M] proposal probabilities q', each real row summing to 1
    uniforms: torch.Tensor    # [R, K+1] U[0,1): column j tests d_{j+1}; column k_i draws the next token
    budgets: torch.Tensor     # [R] tokens still allowed, >= 1


def sampled_rows(batch: PaddedRows, drafts: Sequence[Draft], logits: torch.Tensor) -> SampledRows:
    """The sampled ``drafts`` (each has ``sampling``), their padded ``batch`` and the target's ``logits``
    [R, >=K+1, V] as one ``SampledRows``: p warped per row, q' padded, the verification stream's uniforms."""
    logits = logits[:, : batch.width + 1]              # [R, K+1, V]; one position only when every draft is empty
    positions, device = logits.shape[1], logits.device
    settings = (torch.tensor([getattr(d.sampling, name) for d in drafts], device=device).repeat_interleave(positions)
                for name in ("temperature", "top_k", "top_p"))
    probs = warp_probs(logits.reshape(-1, logits.shape[-1]), *settings).reshape(logits.shape)
    q_ids, q_probs = sparse_proposals(drafts, batch.width)
    return SampledRows(probs=probs, draft_ids=batch.draft_ids, draft_lens=batch.lens, q_ids=q_ids.to(device),
                       q_probs=q_probs.to(device), uniforms=verify_uniforms(drafts, batch.width).to(device),
                       budgets=batch.budgets)


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


def warp_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, with transformers' semantics, one setting per row.

    logits [R, V]; temperature, top_p float [R]; top_k int [R] (0: off). Rows with temperature 0 are
    treated as temperature 1 (greedy rows never use these probabilities).

    Never NaN. A NaN logit is no candidate. A row whose scores overflow to +inf (a temperature so small
    that dividing by it overflows float32, or +inf logits) takes the temperature -> 0 limit: an even split
    among its top logits, i.e. greedy. A row with no usable logit at all is all zeros, "no distribution", which
    ``rejection_sample`` refuses when it needs that row.
    """
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    scores = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    top_logit, top_score = logits.amax(dim=-1, keepdim=True), scores.amax(dim=-1, keepdim=True)   # [R, 1]
    overflowed = top_score.isposinf() | (top_score.isneginf() & top_logit.isfinite())
    if bool(overflowed.any()):  # the temperature -> 0 limit: the top logits (ties split evenly)
        top = torch.zeros_like(scores).masked_fill(logits < top_logit, float("-inf"))
        scores = torch.where(overflowed, top, scores)
    empty = scores.amax(dim=-1, keepdim=True) == float("-inf")                          # [R, 1]
    scores = scores.masked_fill(empty, 0.0)
    vocab = scores.shape[-1]
    if bool((top_k > 0).any()):
        k = top_k.clamp(min=1, max=vocab)
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])     # [R, 1]
        remove = (scores < kth) & (top_k > 0)[:, None]
        scores = scores.masked_fill(remove, float("-inf"))
    if bool((top_p < 1).any()):
        ascending, order = scores.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)[:, None]
        remove_sorted[:, -1] = False                                                     # keep at least one
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove & (top_p < 1)[:, None], float("-inf"))
    return scores.softmax(dim=-1).masked_fill(empty, 0.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised max(0, p - q'): what the target still owes after the draft's share."""
    return (p - q).clamp(min=0)


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` [R, V] using ``uniforms`` [R] in [0, 1)."""
    cdf = weights.double().cumsum(dim=-1)                                   # [R, V]
    target = uniforms.double()[:, None] * cdf[:, -1:]                       # [R, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)          # first cdf > u * total
    return index.clamp(max=weights.shape[-1] - 1)


def rejection_sample(rows: SampledRows, eos_ids: torch.Tensor) -> VerifyResult:
    """Accept d_i with probability min(1, p_i(d_i) / q'_i(d_i)); at the first rejection draw the recovered token
    from norm(max(0, p - q')), after k accepted the bonus from p (module doc). ``eos_ids`` [E]."""
    probs, draft_ids, draft_lens, q_ids, q_probs = rows.probs, rows.draft_ids, rows.draft_lens, rows.q_ids, rows.q_probs
    batch, k_max = draft_ids.shape
    vocab = probs.shape[-1]
    # Rows 0..k_i decide this draft; one without a distribution (no finite target logit) cannot be sampled.
    read = torch.arange(probs.shape[1], device=probs.device)[None, :] <= draft_lens[:, None]   # [B, K+1]
    if bool(((probs.sum(dim=-1) == 0) & read).any()):
        raise ValueError("the target's logits hold no finite value at a verified position; cannot sample")
    positions = torch.arange(k_max, device=probs.device)
    valid = positions[None, :] < draft_lens[:, None]                                     # [B, K]
    safe_ids = draft_ids.clamp(min=0)  # NO_TOKEN padding is no id: read any id there, ``valid`` masks it
    p_d = probs[:, :k_max].gather(2, safe_ids[..., None]).squeeze(-1).double()          # [B, K] p_i(d_i)
    q_d = (q_probs * (q_ids == draft_ids[..., None])).sum(dim=-1).double()              # [B, K] q'_i(d_i)
    ratio = torch.where(q_d > 0, p_d / q_d.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    accept = (rows.uniforms[:, :k_max].double() < ratio) & valid                         # [B, K]
    stops = apply_stops(draft_ids, accept.to(torch.int64).cumprod(dim=1).sum(dim=1), rows.budgets, eos_ids)
    accepted = stops.accepted                                                            # [B]

    # The next token's distribution: residual at the first rejection, p itself after k accepted.
    row = accepted.clamp(max=probs.shape[1] - 1)
    p_next = probs.gather(1, row[:, None, None].expand(batch, 1, vocab)).squeeze(1)     # [B, V]
    rejected = (accepted < draft_lens) & stops.has_next
    if k_max > 0:
        proposal_row = accepted.clamp(max=k_max - 1)[:, None, None].expand(batch, 1, q_ids.shape[-1])
        next_q_ids = q_ids.gather(1, proposal_row).squeeze(1)                           # [B, M]
        next_q_probs = q_probs.gather(1, proposal_row).squeeze(1) * rejected[:, None]
        q_dense = torch.zeros_like(p_next).scatter_add(1, next_q_ids, next_q_probs.to(p_next.dtype))
    else:
        q_dense = torch.zeros_like(p_next)
    residual = residual_distribution(p_next, q_dense)
    # p == q' leaves no residual; rejection then had probability 0, so any fallback is never used: take p.
    weights = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    next_token = sample_inverse_cdf(weights, rows.uniforms.gather(1, draft_lens[:, None]).squeeze(1))
    return stops.result(next_token=next_token, draft_lens=draft_lens, eos_ids=eos_ids)
