"""Speculative decoding's acceptance counts: one type for every place that keeps them, an edge session
(``sled_edge.session.SessionStats``), a verifier (``sled_verifier.stats.VerifierStats``) and an observer's
traffic per session (sled-inspect). Pure.

Names and definitions are vLLM's (its ``SpecDecodingStats`` counters and what its logger derives): a round is one
draft and its verdict (``num_drafts``); mean acceptance length = 1 + accepted / rounds, the tokens one round
commits (accepted draft tokens plus the recovered or bonus token); draft acceptance rate = accepted / drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["AcceptanceCounts"]


@dataclass
class AcceptanceCounts:
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: rounds whose draft token j was accepted
    positions_kept: ClassVar[int] = 1 << 16  # per-position counts kept (an observer of any traffic keeps fewer)

    def record(self, k: int, accepted: int) -> None:
        """One round: ``k`` draft tokens, the first ``accepted`` of them accepted."""
        self.rounds += 1
        self.draft_tokens += k
        self.accepted_tokens += accepted
        kept = min(k, self.positions_kept)
        self.accepted_per_position.extend([0] * (kept - len(self.accepted_per_position)))
        for j in range(min(accepted, kept)):
            self.accepted_per_position[j] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per round: 1 + accepted / rounds (0 before any round)."""
        return 1.0 + self.accepted_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def spec_decode(self) -> dict[str, object]:
        """The counts under vLLM's names (``SpecDecodingStats``, and the two figures its logger derives)."""
        return {"num_drafts": self.rounds, "num_draft_tokens": self.draft_tokens,
                "num_accepted_tokens": self.accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.accepted_per_position),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "draft_acceptance_rate": round(self.acceptance_rate, 4)}
