"""The drafts waiting for a verification step: at most one per session, oldest first. Pure.

The service offers each decoded draft, takes the oldest ones for a step and hands back those the engine
deferred; ``sled_verifier.scheduler`` decides when and how many (``delay_s``, ``batch_size``) from what
``state`` and ``scored_tokens`` report. The discipline:

- one queued draft per session, keyed by (device, session): a newer round replaces the queued one in
  place and keeps its arrival time (its place in line and its wait budget); an older round arriving
  late is dropped;
- bounded: a draft of a session with nothing queued is refused while ``max_drafts`` are queued, or while
  its device has ``device_max_drafts`` queued (one device cannot fill the queue for the others);
- taken fairly: round robin across devices (each device's oldest draft, devices in the order of their
  oldest draft, those over their share last; then each one's second oldest; ...), so when a step cannot
  take everything, a device with 200 queued drafts gets one place per round like a device with one; and
  one device's drafts add at most ``device_step_tokens`` tokens to a step (its first always goes), so a
  device running many sessions cannot make every step long for the others: its sessions share its part
  of each step; a device over its share
  of the verifier's time (``FairShare``, told by ``over_share``) adds its first draft only, and a queue of
  such drafts alone, of devices with more queued behind them, is ``held`` (the scheduler lets them ride
  along others' steps);
- a draft the engine deferred (its prefill did not fit the step) goes back to the head with its arrival
  time, in the order it was taken, unless a newer round of its session arrived meanwhile (that one is
  verified instead), or its session was closed during the step (it must not reopen it).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from sled_protocol import Draft
from sled_verifier.scheduler import QueueState

SessionKey = tuple[str, str]  # (device, session)


class Offer(Enum):
    QUEUED = "queued"  # queued, or replaced the session's older queued round
    LATE = "late"      # an older round than the one already queued: dropped, nothing to answer
    FULL = "full"      # a new session's draft while the queue is full: refuse it
    DEVICE_FULL = "device_full"  # a new session's draft while its device has its quota queued: refuse it


@dataclass(frozen=True)
class Queued:
    draft: Draft
    arrival_s: float     # when the session's queued round first arrived (monotonic clock)
    arrival_step: int = 0  # how many steps the verifier had begun by then (fairness is counted in steps)

    @property
    def key(self) -> SessionKey:
        return (self.draft.device_id, self.draft.session_id)


class DraftQueue:
    def __init__(self, max_drafts: int, device_max_drafts: int | None = None,
                 device_step_tokens: int | None = None) -> None:
        self.max_drafts = max_drafts
        self.device_max_drafts = device_max_drafts or max_drafts
        self.device_step_tokens = device_step_tokens  # None: no per-device limit on a step
        self._queued: OrderedDict[SessionKey, Queued] = OrderedDict()
        self._per_device: Counter[str] = Counter()
        self._in_flight: set[SessionKey] = set()  # taken by the step now running
        self._closed: set[SessionKey] = set()     # of those, closed meanwhile: never requeued
        self._one_draft: frozenset[str] = frozenset()  # devices over their share of time: one draft a step

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, key: SessionKey) -> bool:
        return key in self._queued

    def offer(self, draft: Draft, now_s: float, step: int = 0) -> Offer:
        key = (draft.device_id, draft.session_id)
        queued = self._queued.get(key)
        if queued is not None and queued.draft.seq > draft.seq:
            return Offer.LATE
        if queued is None and len(self._queued) >= self.max_drafts:
            return Offer.FULL
        if queued is None and self._per_device[draft.device_id] >= self.device_max_drafts:
            return Offer.DEVICE_FULL
        # Assigning to an existing key keeps its position: the newer round waits where the older one did.
        self._queued[key] = Queued(draft, now_s, step) if queued is None else \
            Queued(draft, queued.arrival_s, queued.arrival_step)
        if queued is None:
            self._per_device[draft.device_id] += 1
        return Offer.QUEUED

    def queued_of(self, device: str) -> int:
        return self._per_device[device]

    def devices(self) -> frozenset[str]:
        """Devices with a draft queued."""
        return frozenset(self._per_device)

    def drop(self, key: SessionKey) -> None:
        """The session ended: its queued draft, if any, will never be verified, nor one the step now running
        defers."""
        if self._queued.pop(key, None) is not None:
            self._uncount(key[0])
        if key in self._in_flight:
            self._closed.add(key)

    def _uncount(self, device: str) -> None:
        self._per_device[device] -= 1
        if self._per_device[device] <= 0:
            del self._per_device[device]

    def over_share(self, devices: frozenset[str]) -> None:
        """Until told otherwise, each of ``devices`` (over its share of the verifier's time while others have
        work) adds only its first draft to a step."""
        self._one_draft = devices

    def fair_order(self) -> list[Queued]:
        """The queued drafts one step may take, in the order it takes them: round robin across devices, each
        device's drafts oldest first, devices in the order of their oldest draft; of each device, the drafts
        within ``device_step_tokens`` (k + 1 each; the first always), only the first of a device over its share."""
        if len(self._per_device) == len(self._queued) and not self._one_draft:  # one draft a device: queue order
            return list(self._queued.values())
        by_device: dict[str, list[Queued]] = {}
        tokens: Counter[str] = Counter()
        for queued in self._queued.values():
            device, cost = queued.draft.device_id, len(queued.draft.tokens) + 1
            if not tokens[device] or device not in self._one_draft and (
                    self.device_step_tokens is None or tokens[device] + cost <= self.device_step_tokens):
                by_device.setdefault(device, []).append(queued)
                tokens[device] += cost
        # Devices over their share go after the others: a step that cannot take every draft (--max-batch-drafts 1,
        # a token budget) would otherwise take an indebted device's deferred draft from the head again and again,
        # its prefill deferred each time for the others' sake while the others' drafts never ran (a stall).
        order = sorted(by_device.values(), key=lambda drafts: drafts[0].draft.device_id in self._one_draft)
        rounds = max((len(drafts) for drafts in order), default=0)
        return [drafts[i] for i in range(rounds) for drafts in order if i < len(drafts)]

    def scored_tokens(self) -> list[int]:
        """Tokens each queued draft adds to a step's forward (k + 1), in ``fair_order``: what ``batch_size`` weighs."""
        return [len(queued.draft.tokens) + 1 for queued in self.fair_order()]

    def take(self, count: int) -> list[Queued]:
        """The first ``count`` drafts of ``fair_order``, removed from the queue."""
        taken = self.fair_order()[:count]
        for queued in taken:
            del self._queued[queued.key]
            self._uncount(queued.draft.device_id)
        self._in_flight, self._closed = {queued.key for queued in taken}, set()
        return taken

    def requeue(self, deferred: Sequence[Queued]) -> None:
        """Put drafts the engine deferred back at the head, in their order, with their arrival times; ends the
        step that took them."""
        for queued in reversed(deferred):
            # A newer round that arrived during the step goes instead; a session closed during it stays closed.
            if queued.key not in self._queued and queued.key not in self._closed:
                self._queued[queued.key] = queued
                self._queued.move_to_end(queued.key, last=False)
                self._per_device[queued.draft.device_id] += 1
        self._in_flight, self._closed = set(), set()

    def state(self, idle_since_s: float, prefill_budget: int,
              gap_of: Callable[[SessionKey], float] | None = None) -> QueueState:
        """The queue as the scheduler sees it: drafts, and the tokens a step over all of them would score
        (each k + 1, plus prefill of new contexts up to the per-step ``prefill_budget``). A draft could first
        run at its arrival or when the model went idle, whichever is later. ``gap_of``: a session's gap (its
        rounds outside the verifier, ``Arrivals.gap_s``), summed over the drafts a step would take."""
        takeable = self.fair_order()  # the globally oldest draft is always among them (its device's first)
        oldest = next(iter(self._queued.values()), None)
        ready_s = max(oldest.arrival_s, idle_since_s) if oldest is not None else None
        prefill = sum(len(q.draft.context) for q in takeable if q.draft.context is not None)
        prefill = min(prefill, prefill_budget)
        scored = sum(len(q.draft.tokens) + 1 for q in takeable)
        # Held: only drafts of devices over their share with more queued behind (a device with one round in
        # flight cannot drive steps faster than its verdicts come back; holding it would only add to its wait).
        held = bool(takeable) and all(q.draft.device_id in self._one_draft and self._per_device[q.draft.device_id] > 1
                                      for q in takeable)
        prefill_only = bool(takeable) and all(q.draft.context is not None for q in takeable)
        gaps_s = sum(gap_of(q.key) for q in takeable) if gap_of is not None else 0.0
        return QueueState(len(takeable), scored + prefill, ready_s, prefill, held, prefill_only, gaps_s)
