"""One generation on the edge: committed tokens, round numbers, applying verdicts, statistics. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from sled_protocol import Draft, FinishReason, SamplingParams, Verdict, VerdictKind
from sled_protocol.acceptance import AcceptanceCounts


class VerdictMismatch(ValueError):
    """A verdict that does not fit the draft it answers (a verifier bug or a crossed session)."""


@dataclass
class SessionStats(AcceptanceCounts):
    """One generation's acceptance counts (``spec_decode()``: vLLM's names), and what its round trips met."""

    resyncs: int = 0
    retries: int = 0
    failovers: int = 0
    guesses: int = 0         # proactive drafting: next rounds drafted while a round was verified
    guesses_held: int = 0    # of which the verdict agreed, so the round went out at once


@dataclass
class EdgeSession:
    session_id: str
    device_id: str
    vocab: str
    committed: list[int]
    max_len: int
    seq: int = 0
    sampling: SamplingParams | None = None  # None: greedy
    target: str | None = None  # identity of the target the session opened on; it never moves to another
    send_context: bool = True  # the verifier has not seen this session yet
    finish: FinishReason | None = None
    stats: SessionStats = field(default_factory=SessionStats)

    def __post_init__(self) -> None:
        if not self.committed:
            raise ValueError("a session needs at least one prompt token")
        if self.max_len <= len(self.committed):
            raise ValueError("max_len leaves no room for new tokens")

    @property
    def budget(self) -> int:
        return self.max_len - len(self.committed)

    def draft(self, tokens: list[int], proposals=None) -> Draft:
        """This round's Draft; ``proposals`` are the SparseProposals the tokens were sampled from."""
        sampled = self.sampling is not None and not self.sampling.greedy
        return Draft(
            device_id=self.device_id, session_id=self.session_id, seq=self.seq, base_len=len(self.committed),
            tokens=tuple(tokens), max_len=self.max_len, vocab=self.vocab,
            context=tuple(self.committed) if self.send_context else None,
            sampling=self.sampling if sampled else None,
            q_ids=tuple(p.ids for p in proposals) if sampled and proposals is not None else None,
            q_probs=tuple(p.probs for p in proposals) if sampled and proposals is not None else None,
        )

    def apply(self, draft: Draft, verdict: Verdict) -> list[int]:
        """Commit a VERIFIED verdict for ``draft``; returns the newly committed tokens."""
        assert verdict.kind is VerdictKind.VERIFIED and verdict.seq == draft.seq
        new_tokens = list(draft.tokens[: verdict.accepted])
        if verdict.next_token is not None:
            new_tokens.append(verdict.next_token)
        if verdict.accepted > len(draft.tokens) or verdict.committed_len != draft.base_len + len(new_tokens):
            raise VerdictMismatch(f"verdict for seq {draft.seq} commits {verdict.committed_len} tokens, "
                                  f"inconsistent with base {draft.base_len} + {len(new_tokens)}")
        self.committed.extend(new_tokens)
        self.seq += 1
        self.send_context = False
        self.finish = verdict.finish
        self.stats.record(len(draft.tokens), verdict.accepted)
        return new_tokens
