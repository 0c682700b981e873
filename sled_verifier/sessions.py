"""Per-session bookkeeping on the verifier: committed tokens, round numbers, quotas and eviction. Pure.

A session's committed tokens x[0:n] are all verified; the target's KV cache (owned by the engine,
opaque here) always covers x[0:n-1], so each round scores ``[x[n-1], d_1..d_k]``.

Eviction never takes a live session from a device within its quota. A new session takes the place of a
finished session (it holds no KV slot, only the answer to a retry), else of one silent for ``idle_s`` (its
device vanished without a Close): of its own device's when that device already holds ``device_max_sessions``,
else (the table is full) from the device holding the most sessions. Failing that, the new session is refused:
the service answers OVERLOADED and the edge backs off or moves to another verifier. So a device's open
sessions are limited, and one opening session after session churns nobody's cache, its own included.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
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
    used_s: float = 0.0               # when a draft of it last ran (monotonic clock, the engine's)

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


SessionKey = tuple[str, str]  # (device, session)


@dataclass
class SessionTable:
    max_sessions: int
    device_max_sessions: int = 0      # 0: max_sessions
    idle_s: float = 60.0
    # Keyed by (device, session): one device cannot reach another's session by guessing its id.
    _sessions: OrderedDict[SessionKey, SessionState] = field(default_factory=OrderedDict)  # least recently used first
    _per_device: Counter[str] = field(default_factory=Counter)
    evictions: int = 0

    def __post_init__(self) -> None:
        self.device_max_sessions = self.device_max_sessions or self.max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, device: str, session_id: str) -> SessionState | None:
        return self._sessions.get((device, session_id))

    def admit(self, draft: Draft) -> Admission:
        """Decide what to do with ``draft``; the order of the checks matters (retries before context)."""
        state = self._sessions.get((draft.device_id, draft.session_id))
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

    def held_by(self, device: str) -> int:
        return self._per_device[device]

    def open(self, draft: Draft, now_s: float, protected: frozenset[SessionKey] = frozenset()
             ) -> tuple[SessionState | None, list[SessionState]]:
        """(Re)create the session from the draft's context; returns it (None: refused, no room without taking
        from a device within its quota) and the sessions it displaced (the one it replaces and any evicted),
        whose resources the caller frees. Sessions in ``protected`` (the current batch's) are never evicted."""
        assert draft.context is not None
        key = (draft.device_id, draft.session_id)
        replaced = self._pop(key)
        displaced = [replaced] if replaced is not None else []
        while self._per_device[draft.device_id] >= self.device_max_sessions or len(self._sessions) >= self.max_sessions:
            victim = self._victim(draft.device_id, now_s, protected)
            if victim is None:
                return None, displaced
            displaced.append(self._pop(victim))
            self.evictions += 1
        state = SessionState(draft.session_id, draft.device_id, list(draft.context), draft.max_len, used_s=now_s)
        self._sessions[key] = state
        self._per_device[draft.device_id] += 1
        return state, displaced

    def _victim(self, device: str, now_s: float, protected: frozenset[SessionKey]) -> SessionKey | None:
        """Whose session makes room for one of ``device``'s: see the module docstring."""
        candidates = [key for key in self._sessions if key not in protected]  # least recently used first
        if self._per_device[device] >= self.device_max_sessions:
            candidates = [key for key in candidates if key[0] == device]
        for evictable in (lambda s: s.finished, lambda s: now_s - s.used_s >= self.idle_s):
            keys = [key for key in candidates if evictable(self._sessions[key])]
            if keys:
                most = max(self._per_device[key[0]] for key in keys)
                return next(key for key in keys if self._per_device[key[0]] == most)
        return None

    def _pop(self, key: SessionKey) -> SessionState | None:
        state = self._sessions.pop(key, None)
        if state is not None:
            self._per_device[key[0]] -= 1
            if self._per_device[key[0]] <= 0:
                del self._per_device[key[0]]
        return state

    def forget(self, device: str, session_id: str) -> None:
        self._pop((device, session_id))

    def touch(self, state: SessionState, now_s: float) -> None:
        state.used_s = now_s
        self._sessions.move_to_end((state.device, state.session_id))

    def active(self) -> int:
        return sum(1 for s in self._sessions.values() if not s.finished)

    def full(self, now_s: float) -> dict[str, frozenset[str]]:
        """Devices at their quota with no session of their own to give up (none finished or idle), and the
        sessions each holds: a new session of theirs would be refused."""
        at_quota = {device for device, held in self._per_device.items() if held >= self.device_max_sessions}
        held: dict[str, set[str]] = {device: set() for device in at_quota}
        for (device, session_id), state in self._sessions.items():
            if device in held:
                held[device].add(session_id)
                if state.finished or now_s - state.used_s >= self.idle_s:
                    at_quota.discard(device)
        return {device: frozenset(held[device]) for device in at_quota}
