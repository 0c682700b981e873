"""The edge's half of speculative decoding, as a two-call drafter: ``propose`` then ``rollback``; and
proactive drafting (SpecEdge, Park et al. 2025, arXiv 2505.17052): ``draft_ahead`` drafts the next round
while this one is being verified, as if the verifier will accept every draft token and its next token will
be the draft's own most likely token after them.

``propose`` keeps the greedy and sampled paths apart, as vLLM's rejection sampler does: a greedy round takes
the argmax and never touches warping, proposals or random numbers; a sampled one draws from the top-m
proposal q', which goes on the wire with its tokens.

Invariant: the draft cache only ever covers a prefix of the committed tokens plus the current round's draft
tokens (and, while a guess is drafted, the guessed next token and the guessed round's drafts); ``rollback``
truncates it to the committed prefix, so the next ``propose`` feeds just the tokens it has not seen.
A guess proposes exactly what ``propose`` would once the verdict agrees with it: the same committed
tokens, the same k (the caller's), the same random numbers (seeded by the committed length). So it changes
only when a round is sent, never what is sent, and output stays the target's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sled_edge.proposal import SparseProposal, sample_proposal, sparse_proposal, warp_probs
from sled_protocol import SamplingParams
from sled_protocol.seeding import STREAM_DRAFT, round_seed


UNGUESSED = -1  # a Guess's assumed next token until the drafting thread has guessed it (never a token id)


class DraftModel(Protocol):
    eos_ids: frozenset[int]

    def new_cache(self): ...

    def feed(self, cache, tokens: list[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]
    sparse: list[SparseProposal] | None  # per token, the q' it was sampled from; None when greedy
    draft_s: float = 0.0                 # seconds spent drafting it


class Abandoned(Exception):
    """A guess given up before it was finished (the verdict disagreed, or the generation ended)."""


@dataclass
class Guess:
    """The next round drafted ahead. ``next_token`` and ``proposal`` are written by the drafting thread;
    ``abandoned`` by the event loop, read by the thread between tokens."""

    base_len: int                   # committed tokens when the round went out
    committed: list[int]            # what it assumes they will be: those, every draft token, next_token
    k: int                          # the next round's draft length if the guess is right
    next_token: int | None = None   # the draft's argmax after the last draft token
    proposal: Proposal | None = None
    abandoned: bool = False

    @classmethod
    def after(cls, committed: list[int], draft_tokens: list[int], k: int) -> Guess:
        return cls(len(committed), [*committed, *draft_tokens, UNGUESSED], k)

    def agrees(self, committed: list[int]) -> bool:
        """Whether the verdict committed what the guess assumed (the first ``base_len`` are shared)."""
        return (self.proposal is not None and len(committed) == len(self.committed)
                and committed[self.base_len :] == self.committed[self.base_len :])


class Drafter:
    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.cache = model.new_cache()

    def propose(self, committed: list[int], k: int, sampling: SamplingParams | None = None,
                proposal_tokens: int = 16, abandoned: Callable[[], bool] | None = None) -> Proposal:
        """Up to ``k`` draft tokens after ``committed``, stopping after an EOS: the argmax when ``sampling`` is
        None or greedy, else drawn from the top-``proposal_tokens`` proposal q', which is returned with them
        (it goes on the wire). ``abandoned`` is asked before each forward pass; when it says so, raises
        ``Abandoned``."""
        started = time.perf_counter()
        greedy = sampling is None or sampling.greedy
        if k <= 0:
            return Proposal([], None if greedy else [])
        assert self.cache.length < len(committed), "cache must lag the committed tokens"
        logits = self._feed(committed[self.cache.length :], abandoned)  # [V]
        if greedy:
            tokens = self._greedy(logits, k, abandoned)
            return Proposal(tokens, None, time.perf_counter() - started)
        tokens, sparse = self._sampled(logits, k, sampling, proposal_tokens, len(committed), abandoned)
        return Proposal(tokens, sparse, time.perf_counter() - started)

    def _greedy(self, logits: np.ndarray, k: int, abandoned: Callable[[], bool] | None) -> list[int]:
        tokens: list[int] = []
        while True:
            tokens.append(int(np.argmax(logits)))
            if len(tokens) == k or tokens[-1] in self.model.eos_ids:
                return tokens
            logits = self._feed(tokens[-1:], abandoned)

    def _sampled(self, logits: np.ndarray, k: int, sampling: SamplingParams, proposal_tokens: int, base_len: int,
                 abandoned: Callable[[], bool] | None) -> tuple[list[int], list[SparseProposal]]:
        rng = np.random.default_rng(round_seed(sampling.seed, base_len, STREAM_DRAFT))
        tokens: list[int] = []
        sparse: list[SparseProposal] = []
        while True:
            sparse.append(sparse_proposal(warp_probs(logits, sampling), proposal_tokens))
            tokens.append(sample_proposal(sparse[-1], rng))
            if len(tokens) == k or tokens[-1] in self.model.eos_ids:
                return tokens, sparse
            logits = self._feed(tokens[-1:], abandoned)

    def draft_ahead(self, guess: Guess, sampling: SamplingParams | None, proposal_tokens: int = 16) -> None:
        """In a worker thread while a round is verified: feed the round's last draft token, guess the next
        token (the draft's argmax), and draft the next round after it into ``guess``. Stops at the next
        forward pass once ``guess.abandoned`` is set; leaves no proposal when the guess ends the generation
        (an EOS). The caller must not touch this drafter until this returns."""
        stop = lambda: guess.abandoned  # noqa: E731
        try:
            logits = self._feed(guess.committed[self.cache.length : -1], stop)
            guess.next_token = int(np.argmax(logits))
            guess.committed[-1] = guess.next_token
            # Forget the last draft token again: after an all-accepted verdict a drafter that did not guess
            # feeds it and the next token in one pass, and the guess must match it to the last bit.
            self.cache.truncate(len(guess.committed) - 2)
            if guess.next_token not in self.model.eos_ids:
                guess.proposal = self.propose(guess.committed, guess.k, sampling, proposal_tokens, stop)
        except Abandoned:
            pass

    def _feed(self, tokens: list[int], abandoned: Callable[[], bool] | None) -> np.ndarray:
        if abandoned is not None and abandoned():
            raise Abandoned
        return self.model.feed(self.cache, tokens)

    def rollback(self, committed_len: int, base_len: int, accepted: int, drafted: int | None = None) -> None:
        """KV rollback after a verdict: keep only positions now known to be committed (prefix + accepted drafts).
        ``drafted`` (the round's draft length) also drops what a dropped guess fed beyond the round: a round's
        own drafting never feeds its last token, so the cache ends where it would have without the guess and
        the next round's passes - and a sampled round's q', bit for bit - are the same."""
        keep = min(base_len + accepted, committed_len - 1)
        if drafted is not None:
            keep = min(keep, base_len + max(drafted - 1, 0))
        self.cache.truncate(keep)

    def reset(self) -> None:
        self.cache = self.model.new_cache()
