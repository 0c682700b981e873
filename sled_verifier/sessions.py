"""Per-session bookkeeping on the verifier: committed tokens, round numbers, LRU eviction. Pure.

A session's committed tokens x[0:n] are all verified; the target's KV cache (owned by the engine,
opaque here) always covers x[0:n-1], so each round scores ``[x[n-1], d_1..d_k]``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from sled_protocol import Draft, Verdict


@dataclass
class SessionState:
    session_id: str
    device: str
    committed: list[int]
    max_len: int
    slot: int | None = None           # engine-owned KV slot; None until prefilling starts
    cached: int = 0                   # valid KV positions in the slot; len(committed) - 1 once prefilled
    last_seq: int = -1
    last_verdict: Verdict | None = None
    finished: bool = False
    rounds: int = 0

    @property
    def prefilled(self) -> bool:
        """The cache covers committed[:-1]: the session can be verified."""
        return self.cached >= len(self.committed) - 1

    @property
    def budget(self) -> int:
        """Tokens this session may still commit (max_len - n)."""
        return self.max_len - len(self.committed)


class Admission(Enum):
    RUN = "run"            # verify this draft
    REBUILD = "rebuild"    # (re)open the session from the draft's context, then verify
    RESEND = "resend"      # a retry of the round already verified: send the same verdict again
    STALE = "stale"        # an older round than the last verified one: drop
    RESYNC = "resync"      # state missing or diverged: ask the edge for its full context
    FINISHED = "finished"  # the session already ended
    DEFERRED = "deferred"  # its prefill did not fit this step's budget: verify it in a later step


@dataclass
class SessionTable:
    max_sessions: int
    # Keyed by (device, session): one device cannot reach another's session by guessing its id.
    _sessions: OrderedDict[tuple[str, str], SessionState] = field(default_factory=OrderedDict)
    evictions: int = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, device: str, session_id: str) -> SessionState | None:
        return self._sessions.get((device, session_id))

    def admit(self, draft: Draft) -> Admission:
        """Decide what to do with ``draft``; the order of the checks matters (retries before context)."""
        state = self._sessions.get((draft.device, draft.session))
        if state is not None:
            if draft.seq == state.last_seq and state.last_verdict is not None:
                return Admission.RESEND
            if draft.seq < state.last_seq:
                return Admission.STALE
            if state.finished:
                return Admission.FINISHED
        if draft.context is not None:
            # Context we already hold (a duplicate first round, or an edge that always sends it) costs no prefill.
            if state is not None and state.slot is not None and draft.base_len == len(state.committed) \
                    and list(draft.context) == state.committed:
                return Admission.RUN
            return Admission.REBUILD
        if state is None or draft.base_len != len(state.committed):
            return Admission.RESYNC
        return Admission.RUN

    def open(self, draft: Draft, protected: frozenset[tuple[str, str]] = frozenset()) -> tuple[SessionState, list[SessionState]]:
        """(Re)create the session from the draft's context; returns it and the sessions it displaced (the
        one it replaces and any evicted), whose resources the caller frees.

        Eviction takes the least recently used session that is not ``protected`` (the current batch's).
        """
        assert draft.context is not None
        replaced = self._sessions.pop((draft.device, draft.session), None)
        evicted = [replaced] if replaced is not None else []
        candidates = (key for key in list(self._sessions) if key not in protected)
        while len(self._sessions) >= self.max_sessions:
            key = next(candidates, None)
            if key is None:
                break  # everything left is in this batch; the table briefly holds one more
            evicted.append(self._sessions.pop(key))
            self.evictions += 1
        state = SessionState(draft.session, draft.device, list(draft.context), draft.max_len)
        self._sessions[(draft.device, draft.session)] = state
        return state, evicted

    def forget(self, device: str, session_id: str) -> None:
        self._sessions.pop((device, session_id), None)

    def touch(self, state: SessionState) -> None:
        self._sessions.move_to_end((state.device, state.session_id))

    def active(self) -> int:
        return sum(1 for s in self._sessions.values() if not s.finished)
