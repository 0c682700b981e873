"""One generation on the edge: committed tokens, round numbers, applying verdicts, statistics. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from sled_protocol import Draft, FinishReason, SamplingParams, Verdict, VerdictKind


class VerdictMismatch(ValueError):
    """A verdict that does not fit the draft it answers (a verifier bug or a crossed session)."""


@dataclass
class SessionStats:
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: rounds whose draft token j was accepted
    resyncs: int = 0
    retries: int = 0
    failovers: int = 0
    guesses: int = 0         # proactive drafting: next rounds drafted while a round was verified
    guesses_held: int = 0    # of which the verdict agreed, so the round went out at once

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verification round: 1 + accepted / rounds (as vLLM defines it)."""
        return 1.0 + self.accepted_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def record(self, k: int, accepted: int) -> None:
        self.rounds += 1
        self.draft_tokens += k
        self.accepted_tokens += accepted
        self.accepted_per_position.extend([0] * (k - len(self.accepted_per_position)))
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    def spec_decode(self) -> dict[str, object]:
        """This request's speculative decoding figures under vLLM's names (its ``SpecDecodingStats`` counters,
        and the mean acceptance length and draft acceptance rate its logger derives from them)."""
        return {"num_drafts": self.rounds, "num_draft_tokens": self.draft_tokens,
                "num_accepted_tokens": self.accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.accepted_per_position),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "draft_acceptance_rate": round(self.acceptance_rate, 4)}


@dataclass
class EdgeSession:
    session_id: str
    device: str
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
            device=self.device, session_id=self.session_id, seq=self.seq, base_len=len(self.committed),
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
