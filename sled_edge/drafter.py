"""The edge's half of speculative decoding, as a two-call drafter: ``propose`` then ``learn``.

Invariant: the draft cache only ever covers a prefix of the committed tokens plus the current round's
draft tokens; ``learn`` rolls it back to the committed prefix, so the next ``propose`` feeds just the
tokens it has not seen (the verifier's next token, and the last draft token if all were accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sled_edge.proposal import SparseProposal, sample_proposal, sparse_proposal, warp_probs
from sled_protocol import SamplingParams
from sled_protocol.messages import STREAM_DRAFT, round_seed


class DraftModel(Protocol):
    eos_ids: frozenset[int]

    def new_cache(self): ...

    def feed(self, cache, tokens: list[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]
    sparse: list[SparseProposal] | None  # per token, the q' it was sampled from; None when greedy


class Drafter:
    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.cache = model.new_cache()

    def propose(self, committed: list[int], k: int) -> list[int]:
        """Up to ``k`` greedy draft tokens after ``committed``; stops after drafting an EOS."""
        return self.propose_sampled(committed, k, None).tokens

    def propose_sampled(self, committed: list[int], k: int, sampling: SamplingParams | None,
                        proposal_tokens: int = 16) -> Proposal:
        """Up to ``k`` draft tokens: argmax when ``sampling`` is None or at temperature 0, else drawn from
        the top-``proposal_tokens`` proposal q', which is returned with them (it goes on the wire)."""
        greedy = sampling is None or sampling.temperature == 0
        if k <= 0:
            return Proposal([], None if greedy else [])
        assert self.cache.length < len(committed), "cache must lag the committed tokens"
        rng = None if greedy else np.random.default_rng(round_seed(sampling.seed, len(committed), STREAM_DRAFT))
        logits = self.model.feed(self.cache, committed[self.cache.length :])
        tokens: list[int] = []
        sparse: list[SparseProposal] = []
        while True:
            if greedy:
                token = int(np.argmax(logits))
            else:
                sparse.append(sparse_proposal(warp_probs(logits, sampling), proposal_tokens))
                token = sample_proposal(sparse[-1], rng)
            tokens.append(token)
            if len(tokens) == k or token in self.model.eos_ids:
                return Proposal(tokens, None if greedy else sparse)
            logits = self.model.feed(self.cache, [token])

    def learn(self, committed_len: int, base_len: int, accepted: int) -> None:
        """KV rollback: keep only positions now known to be committed (prefix + accepted drafts)."""
        self.cache.truncate(min(base_len + accepted, committed_len - 1))

    def reset(self) -> None:
        self.cache = self.model.new_cache()
