"""Which verifier may hold a session: a pure choice over the verifiers' announced statuses.

A session opens on the least loaded online verifier with the edge's vocabulary and records the identity
of that verifier's target (``Status.target``, a hash over its configuration and weights). From then on it
moves only to a verifier announcing the same identity: one tokenizer shared by two models (Qwen2.5-1.5B
and -7B) makes their drafts interchangeable but not their outputs, so vocabulary equality is necessary
and not sufficient. A target that announces no identity cannot be matched, so its sessions never move.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sled_protocol import Status

__all__ = ["Placement", "choose", "describe"]


@dataclass(frozen=True)
class Placement:
    """What a session needs from a verifier. ``pinned``: the session has opened, so ``target`` must match
    (None then means its verifier announced no identity, and nothing else can be proven to match)."""

    vocab: str
    min_context: int = 0
    only: str = ""                  # a configured verifier id; empty: any
    exclude: str | None = None      # the verifier the session is moving away from
    pinned: bool = False
    target: str | None = None


def choose(statuses: Iterable[Status], need: Placement) -> Status | None:
    """The least loaded online verifier (ties by id) that meets ``need``, or None."""
    fitting = [s for s in statuses if s.online and s.verifier_id != need.exclude and s.vocab == need.vocab
               and (not need.only or s.verifier_id == need.only)
               and (not s.max_context_tokens or s.max_context_tokens >= need.min_context)
               and (not need.pinned or (need.target is not None and s.target == need.target))]
    return min(fitting, key=lambda s: (s.load / max(s.capacity, 1), s.verifier_id), default=None)


def describe(statuses: Iterable[Status]) -> str:
    """The online verifiers, with what they serve, for an error message."""
    return ", ".join(f"{s.verifier_id} (target {s.target or 'unannounced'}, model {s.model or '?'}, vocab {s.vocab})"
                     for s in sorted(statuses, key=lambda s: s.verifier_id) if s.online) or "none online"
