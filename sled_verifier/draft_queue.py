"""The drafts waiting for a verification step: at most one per session, oldest first. Pure.

The service offers each decoded draft, takes the oldest ones for a step and hands back those the engine
deferred; ``sled_verifier.scheduler`` decides when and how many (``delay_s``, ``take_batch``) from what
``state`` and ``scored_tokens`` report. The discipline:

- one queued draft per session, keyed by (device, session): a newer round replaces the queued one in
  place and keeps its arrival time (its place in line and its wait budget); an older round arriving
  late is dropped;
- bounded: a draft of a session with nothing queued is refused while ``max_drafts`` are queued;
- taken oldest first; a draft the engine deferred (its prefill did not fit the step) goes back to the
  head with its arrival time, in the order it was taken, unless a newer round of its session arrived
  meanwhile (that one is verified instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from sled_protocol import Draft
from sled_verifier.scheduler import QueueState

SessionKey = tuple[str, str]  # (device, session)


class Offer(Enum):
    QUEUED = "queued"  # queued, or replaced the session's older queued round
    LATE = "late"      # an older round than the one already queued: dropped, nothing to answer
    FULL = "full"      # a new session's draft while the queue is full: refuse it


@dataclass(frozen=True)
class Queued:
    draft: Draft
    arrival_s: float   # when the session's queued round first arrived (monotonic clock)

    @property
    def key(self) -> SessionKey:
        return (self.draft.device, self.draft.session)


class DraftQueue:
    def __init__(self, max_drafts: int) -> None:
        self.max_drafts = max_drafts
        self._queued: OrderedDict[SessionKey, Queued] = OrderedDict()

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, key: SessionKey) -> bool:
        return key in self._queued

    def offer(self, draft: Draft, now_s: float) -> Offer:
        key = (draft.device, draft.session)
        queued = self._queued.get(key)
        if queued is not None and queued.draft.seq > draft.seq:
            return Offer.LATE
        if queued is None and len(self._queued) >= self.max_drafts:
            return Offer.FULL
        # Assigning to an existing key keeps its position: the newer round waits where the older one did.
        self._queued[key] = Queued(draft, queued.arrival_s if queued is not None else now_s)
        return Offer.QUEUED

    def drop(self, key: SessionKey) -> None:
        """The session ended: its queued draft, if any, will never be verified."""
        self._queued.pop(key, None)

    def scored_tokens(self) -> list[int]:
        """Tokens each queued draft adds to a step's forward (k + 1), oldest first: what ``take_batch`` weighs."""
        return [len(queued.draft.tokens) + 1 for queued in self._queued.values()]

    def take(self, count: int) -> list[Queued]:
        """The ``count`` oldest drafts, removed from the queue."""
        return [self._queued.popitem(last=False)[1] for _ in range(min(count, len(self._queued)))]

    def requeue(self, deferred: Sequence[Queued]) -> None:
        """Put drafts the engine deferred back at the head, in their order, with their arrival times."""
        for queued in reversed(deferred):
            if queued.key not in self._queued:  # else a newer round arrived during the step: it goes instead
                self._queued[queued.key] = queued
                self._queued.move_to_end(queued.key, last=False)

    def state(self, idle_since_s: float, prefill_budget: int) -> QueueState:
        """The queue as the scheduler sees it: drafts, and the tokens a step over all of them would score
        (each k + 1, plus prefill of new contexts up to the per-step ``prefill_budget``). A draft could first
        run at its arrival or when the model went idle, whichever is later."""
        oldest = next(iter(self._queued.values()), None)
        ready_s = max(oldest.arrival_s, idle_since_s) if oldest is not None else None
        prefill = sum(len(q.draft.context) for q in self._queued.values() if q.draft.context is not None)
        prefill = min(prefill, prefill_budget)
        return QueueState(len(self._queued), sum(self.scored_tokens()) + prefill, ready_s, prefill)
