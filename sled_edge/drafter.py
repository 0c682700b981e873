"""The edge's half of speculative decoding, as a two-call drafter: ``propose`` then ``learn``.

Invariant: the draft cache only ever covers a prefix of the committed tokens plus the current round's
draft tokens; ``learn`` rolls it back to the committed prefix, so the next ``propose`` feeds just the
tokens it has not seen (the verifier's next token, and the last draft token if all were accepted).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class DraftModel(Protocol):
    eos_ids: frozenset[int]

    def new_cache(self): ...

    def feed(self, cache, tokens: list[int]) -> np.ndarray: ...


class Drafter:
    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.cache = model.new_cache()

    def propose(self, committed: list[int], k: int) -> list[int]:
        """Up to ``k`` greedy draft tokens after ``committed``; stops after drafting an EOS."""
        if k <= 0:
            return []
        assert self.cache.length < len(committed), "cache must lag the committed tokens"
        logits = self.model.feed(self.cache, committed[self.cache.length :])
        tokens: list[int] = []
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            if len(tokens) == k or token in self.model.eos_ids:
                return tokens
            logits = self.model.feed(self.cache, [token])

    def learn(self, committed_len: int, base_len: int, accepted: int) -> None:
        """KV rollback: keep only positions now known to be committed (prefix + accepted drafts)."""
        self.cache.truncate(min(base_len + accepted, committed_len - 1))

    def reset(self) -> None:
        self.cache = self.model.new_cache()
