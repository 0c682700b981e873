"""The edge's sampled draft: warp the draft logits as the target's are warped, keep the top-m, sample.

The proposal q' that is sent is exactly the distribution the token was drawn from: the top-m
probabilities, rounded to float32 (the wire precision) and renormalised. The verifier renormalises the
same float32 values, so both ends agree on q' bit for bit. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sled_protocol import SamplingParams


@dataclass(frozen=True)
class SparseProposal:
    ids: tuple[int, ...]
    probs: tuple[float, ...]   # float32 values as sent, summing to 1 within float32 rounding


def warp_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p with transformers' semantics (as ``sled_verifier.sampling.warp_probs``).

    Never NaN: a NaN logit is no candidate; when scores overflow to +inf (a tiny temperature, +inf logits)
    the top logits split the probability evenly (the greedy limit); no usable logit proposes uniformly. Any
    proposal keeps the verifier's output exact; it only has to be a distribution.
    """
    logits = np.where(np.isnan(logits), -np.inf, logits).astype(np.float32)
    with np.errstate(over="ignore"):
        scores = logits / np.float32(params.temperature)
    top_logit, top_score = logits.max(), scores.max()
    if top_score == np.inf or (top_score == -np.inf and np.isfinite(top_logit)):
        # the temperature -> 0 limit: the top logits (ties split evenly)
        scores = np.where(logits < top_logit, np.float32(-np.inf), np.float32(0))
    if scores.max() == -np.inf:
        return np.full(scores.shape, 1.0 / scores.shape[-1], dtype=np.float32)
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if params.top_p < 1.0:
        order = np.argsort(scores, kind="stable")
        ascending = scores[order]
        exp = np.exp(ascending - ascending[-1])
        cumulative = np.cumsum(exp / exp.sum())
        remove_sorted = cumulative <= (1 - np.float32(params.top_p))
        remove_sorted[-1] = False
        remove = np.empty_like(remove_sorted)
        remove[order] = remove_sorted
        scores = np.where(remove, -np.inf, scores)
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def sparse_proposal(probs: np.ndarray, m: int) -> SparseProposal:
    """The m most likely tokens (zero-probability ones dropped), renormalised and rounded to float32."""
    m = min(m, probs.shape[-1])
    top = np.argpartition(probs, -m)[-m:]
    top = top[np.argsort(-probs[top], kind="stable")]
    top = top[probs[top] > 0]
    weights = probs[top].astype(np.float64)
    q32 = (weights / weights.sum()).astype(np.float32)
    return SparseProposal(tuple(int(t) for t in top), tuple(float(q) for q in q32))


def sample_proposal(proposal: SparseProposal, rng: np.random.Generator) -> int:
    """Draw from q' = float32 probs / their sum (the definition the verifier uses), by inverse CDF."""
    cdf = np.cumsum(np.asarray(proposal.probs, dtype=np.float64))
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return proposal.ids[min(index, len(proposal.ids) - 1)]
