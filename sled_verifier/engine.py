"""One verification step: admit drafts, prefill new sessions, score all in ONE pass, decide, commit.

Synchronous and single-threaded by design: the service runs ``step`` in its one model thread, so
session state and KV caches are never shared between threads. Each session's KV cache is a slot of
the target's ``SlotKV``; ``SessionState.cached`` counts its valid positions (always committed[:-1]
once prefilled), so committing a round is moving that count, and a rejected draft costs no copy.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

import structlog
import torch

from sled_protocol import Draft, ErrorCode, FinishReason, NextKind, Verdict, VerdictKind
from sled_verifier.config import VerifierConfig
from sled_verifier.decide import decide
from sled_verifier.fairshare import FairShare
from sled_verifier.kvslots import slots_within
from sled_verifier.runtime import TargetRuntime, cpu_clock
from sled_verifier.sessions import Admission, SessionState, SessionTable
from sled_verifier.stats import VerifierStats
from sled_verifier.verify import NO_TOKEN, VerifyResult

log = structlog.get_logger("sled_verifier")

Runnable = tuple[Draft, SessionState]  # a draft admitted to this step, and its session
Chunk = tuple[SessionState, list[int]]  # a session's next prefill chunk: the tokens after its cache


class OutcomeKind(Enum):
    """What a step did with one draft (the session table's ``Admission`` decides only part of it)."""

    VERIFIED = "verified"    # verified by this step's forward: its verdict
    RESENT = "resent"        # a retry of the round already verified: the same verdict again
    STALE = "stale"          # an older round than the last verified one: dropped, nothing sent
    RESYNC = "resync"        # state missing or diverged: the edge is asked for its full context
    FINISHED = "finished"    # the session already ended: refused
    DEFERRED = "deferred"    # its prefill did not fit this step's budget: verified in a later step
    REFUSED = "refused"      # a new session with no room for it (overloaded): refused
    DUPLICATE = "duplicate"  # a second draft of one session in one step: refused as malformed
    FAILED = "failed"        # verification failed on this draft alone: refused (internal), its session forgotten


@dataclass(frozen=True)
class Outcome:
    device: str
    verdict: Verdict | None  # None: nothing to send (a stale round, or a draft deferred to a later step)
    kind: OutcomeKind
    draft: Draft             # the draft this answers (a deferred one goes back to the queue as it is)


class KVBudgetError(ValueError):
    """The KV memory budget cannot hold one session at the context limit: a configuration that cannot work."""


@dataclass(frozen=True)
class Quotas:
    """What one step and one device may take; the defaults are ``VerifierConfig``'s."""

    prefill_chunk: int = VerifierConfig.prefill_chunk_tokens    # a context is prefilled in chunks of this
    max_prefill: int = VerifierConfig.max_prefill_tokens        # prefill tokens per step, all sessions
    device_prefill: int = VerifierConfig.device_prefill_tokens  # prefill tokens per step, one device's sessions
    device_max_sessions: int = VerifierConfig.device_max_sessions
    session_idle_s: float = VerifierConfig.session_idle_s

    @classmethod
    def from_config(cls, config: VerifierConfig) -> Quotas:
        return cls(config.prefill_chunk_tokens, config.max_prefill_tokens, config.device_prefill_tokens,
                   config.device_max_sessions, config.session_idle_s)


class VerifierEngine:
    def __init__(self, target: TargetRuntime, verifier_id: str, max_sessions: int, stats: VerifierStats,
                 max_context: int = VerifierConfig.max_context_tokens, quotas: Quotas = Quotas(),
                 kv_budget_bytes: int | None = None) -> None:
        """``kv_budget_bytes``: reserve the KV store now within this budget (``KVBudgetError`` if it cannot
        hold one session of ``max_context`` tokens); None: a store that grows as used (tests, benchmarks)."""
        self.target = target
        self.quotas = quotas
        self.kv = target.init_kv(max_slots=max_sessions, max_length=max_context)
        if kv_budget_bytes is not None:
            per_session = self.kv.bytes_per_token() * self.kv.max_length
            slots = slots_within(kv_budget_bytes, self.kv.bytes_per_token(), self.kv.max_length)
            if slots < 1:
                raise KVBudgetError(
                    f"KV memory budget of {kv_budget_bytes} bytes cannot hold one session of {self.kv.max_length} "
                    f"tokens ({per_session} bytes, plus as much for padding); raise --kv-memory or lower "
                    "--max-context-tokens")
            self.kv = target.init_kv(max_slots=min(max_sessions, slots), max_length=max_context)
            self.kv.reserve()
        self.verifier_id = verifier_id
        # No more sessions than KV slots: a session that would need one more is refused, never half-opened.
        self.sessions = SessionTable(max_sessions=min(max_sessions, self.kv.max_slots),
                                     device_max_sessions=quotas.device_max_sessions, idle_s=quotas.session_idle_s)
        self.stats = stats
        self.active_sessions = 0
        self.session_count = 0
        self.free_sessions = self.sessions.max_sessions  # sessions that can still open without evicting anyone
        self.full_devices: dict[str, frozenset[str]] = {}
        self.fair = FairShare()
        self._active: frozenset[str] = frozenset()   # this step's devices with work
        self._spent_s: dict[str, float] = {}         # this step's seconds by device beyond its first draft
        self.verify_cost: tuple[float, int] | None = None  # the last verification forward's (seconds, prefill tokens)

    def step(self, drafts: Sequence[Draft], active: Collection[str] = ()) -> list[Outcome]:
        """Verify ``drafts``. If it raises, no session's committed tokens or cache have changed (sessions
        opened from a context may exist, consistently, without their prefill), so the batch can be retried.
        A draft whose session's prefill does not fit this step comes back ``DEFERRED``: step it again.
        ``active``: the devices with work besides this step's (queued, or a round expected back), among whom
        the verifier's time is shared (``FairShare``)."""
        started_step = time.perf_counter()
        self._active = frozenset(active) | {draft.device_id for draft in drafts}
        self._spent_s = {}
        self.verify_cost = None
        try:
            return self._step(drafts)
        finally:
            step_s = time.perf_counter() - started_step
            self.stats.step_s += step_s
            self.fair.charge(self._active, step_s, self._spent_s)

    def step_until_answered(self, drafts: Sequence[Draft]) -> list[Outcome]:
        """``step``, then again for deferred drafts until each has its outcome; outcomes in ``drafts`` order.
        For callers without a queue of their own (tests, benchmarks); the service re-queues instead."""
        outcomes = {id(o.draft): o for o in self.step(drafts)}
        while deferred := [o.draft for o in outcomes.values() if o.kind is OutcomeKind.DEFERRED]:
            outcomes.update((id(o.draft), o) for o in self.step(deferred))
        return [outcomes[id(d)] for d in drafts]

    def _step(self, drafts: Sequence[Draft]) -> list[Outcome]:
        # 1. Admit: answer what needs no model (retries, stale rounds, unknown or diverged sessions, a second
        #    draft of a session in this step); open sessions that bring a context.
        outcomes, runnable = self._admit(drafts)
        # 2. Prefill opened sessions (their cache covers x[0:n-1]) within this step's budget; a draft whose
        #    prefill is not complete comes back DEFERRED, the others go on now (the chunks maybe in step 3's forward).
        runnable, deferred, chunks = self._prefill(runnable)
        outcomes += deferred
        if runnable:
            # 3. One batched forward over [x[n-1], d_1..d_k] of every runnable session, written into its slot.
            logits = self._forward(runnable, chunks)                                     # [B, K+1, V]
            # 4. Decide each row: greedy rows by argmax, sampled rows by rejection sampling (never both).
            started = time.perf_counter()
            result = decide([d for d, _ in runnable], [s.budget for _, s in runnable], logits, self.target.eos_ids)
            # 5. Commit and answer; the cache now covers committed[:-1] by moving a count.
            outcomes += self._commit(runnable, result)
            self.stats.decide_s += time.perf_counter() - started
        self._snapshot()
        return outcomes

    def _admit(self, drafts: Sequence[Draft]) -> tuple[list[Outcome], list[Runnable]]:
        """Outcomes of the drafts answered without the model, and the (draft, session) pairs to verify."""
        outcomes: list[Outcome] = []
        runnable: list[Runnable] = []
        now_s = time.monotonic()
        batch_keys = frozenset((d.device_id, d.session_id) for d in drafts)
        seen: set[tuple[str, str]] = set()
        for draft in drafts:
            if (draft.device_id, draft.session_id) in seen:
                verdict = error_verdict(self.verifier_id, draft, ErrorCode.MALFORMED,
                                        "a second draft of this session in one step; one round at a time")
                outcomes.append(Outcome(draft.device_id, verdict, OutcomeKind.DUPLICATE, draft))
                continue
            seen.add((draft.device_id, draft.session_id))
            admission = self.sessions.admit(draft)
            state = self.sessions.get(draft.device_id, draft.session_id)
            if admission is Admission.RESEND:
                outcomes.append(Outcome(draft.device_id, state.last_verdict, OutcomeKind.RESENT, draft))
            elif admission is Admission.STALE:
                outcomes.append(Outcome(draft.device_id, None, OutcomeKind.STALE, draft))
            elif admission is Admission.RESYNC:
                self.stats.resyncs += 1
                outcomes.append(Outcome(draft.device_id, self._resync(draft), OutcomeKind.RESYNC, draft))
            elif admission is Admission.FINISHED:
                verdict = error_verdict(self.verifier_id, draft, ErrorCode.SESSION_FINISHED,
                                        "session already finished; open a new one")
                outcomes.append(Outcome(draft.device_id, verdict, OutcomeKind.FINISHED, draft))
            else:
                if admission is Admission.REBUILD:
                    state, dropped = self.sessions.open(draft, now_s, protected=batch_keys)
                    for old in dropped:
                        self._release(old)
                        if (old.device, old.session_id) != (draft.device_id, draft.session_id):
                            log.debug("session_evicted", device_id=old.device, session_id=old.session_id,
                                      for_device=draft.device_id)
                    if state is None:
                        outcomes.append(Outcome(draft.device_id, self._overloaded(draft), OutcomeKind.REFUSED, draft))
                        continue
                self.sessions.touch(state, now_s)
                runnable.append((draft, state))
        return outcomes, runnable

    def _overloaded(self, draft: Draft) -> Verdict:
        self.stats.refused_sessions += 1
        held = self.sessions.held_by(draft.device_id)
        return error_verdict(self.verifier_id, draft, ErrorCode.OVERLOADED,
                             f"verifier holds its {len(self.sessions)} sessions (this device {held}), none evictable; "
                             "retry later or elsewhere")

    def _prefill(self, runnable: list[Runnable]) -> tuple[list[Runnable], list[Outcome], list[Chunk]]:
        """Move sessions' caches towards committed[:-1] in ONE forward, at most one chunk per session, within
        the step's prefill budgets (``Quotas``), so a step's time stays bounded, new sessions never stall the
        fleet and no device takes more than its share. Returns the pairs ready to verify once this step's chunks
        are in, DEFERRED outcomes of the rest, and the chunks left to ride in the verification forward where the
        runtime ``packs_rows`` (one forward, not two: ~3 ms of a 12M target's step on a CPU)."""
        for _, state in runnable:
            if state.slot is None:
                state.slot, state.cached = self.kv.acquire(), 0
        rows, chunks = self._prefill_chunks([state for _, state in runnable])
        planned = {id(state): len(chunk) for state, chunk in zip(rows, chunks)}
        done = [s.cached + planned.get(id(s), 0) >= len(s.committed) - 1 for _, s in runnable]
        ready = [pair for pair, prefilled in zip(runnable, done) if prefilled]
        if rows and not (ready and getattr(self.target, "packs_rows", False)):
            started = time.perf_counter()
            self.target.forward_rows([s.slot for s in rows], [s.cached for s in rows], chunks, logits=False)
            self._prefilled(rows, chunks, time.perf_counter() - started)
            rows, chunks = [], []
        deferred = [Outcome(d.device_id, None, OutcomeKind.DEFERRED, d) for (d, _), prefilled in zip(runnable, done)
                    if not prefilled]
        self.stats.deferred += len(deferred)
        return ready, deferred, list(zip(rows, chunks))

    def _prefilled(self, rows: Sequence[SessionState], chunks: Sequence[list[int]], prefill_s: float) -> None:
        """Count the chunks a forward wrote into their caches (its ``prefill_s`` seconds, debited by tokens)."""
        self.stats.prefill_s += prefill_s
        tokens = sum(map(len, chunks))
        for state, chunk in zip(rows, chunks):
            self._debit(state.device, prefill_s * len(chunk) / tokens)
            state.cached += len(chunk)
            self.stats.prefill_tokens += len(chunk)

    def _prefill_chunks(self, states: list[SessionState]) -> tuple[list[SessionState], list[list[int]]]:
        """Each session's next chunk, in ``states`` order, while the budgets hold. A chunk is positions
        ``[c*C, min((c+1)*C, n-1))`` of the session's own context (C = ``prefill_chunk``): its boundaries depend
        on the session alone, so its cache (and every logit after it) is the same bits whoever prefills beside
        it, and a rebuild after a resync or failover replays the same chunks. A session whose whole next chunk
        does not fit what is left of a budget waits for a later step rather than take a leftover, and so does
        one whose device has had more than its share of the verifier's time while others have work."""
        chunk, budget, device_budget = self.quotas.prefill_chunk, self.quotas.max_prefill, Counter()
        rows, chunks = [], []
        # Every device with work in debt: the least indebted prefills, else no one would until credit came back
        # from steps that do nothing (a stall: found by tests/test_prefill_chunks.py).
        all_in_debt = all(self.fair.credit(device) < 0.0 for device in self._active)
        waiting = {state.device for state in states if state.cached < len(state.committed) - 1}
        first = max(sorted(waiting), key=self.fair.credit) if all_in_debt and waiting else None
        for state in states:
            end = min((state.cached // chunk + 1) * chunk, len(state.committed) - 1)
            size = end - state.cached
            fair = state.device == first or self.fair.may_prefill(state.device, self._active)
            if size <= 0 or size > budget or size > self.quotas.device_prefill - device_budget[state.device] \
                    or not fair:
                continue
            rows.append(state)
            chunks.append(state.committed[state.cached : end])
            budget -= size
            device_budget[state.device] += size
        return rows, chunks

    def _forward(self, runnable: list[Runnable], chunks: Sequence[Chunk] = ()) -> torch.Tensor:
        """Logits ``[B, K+1, V]`` (``target.PackedLogits`` where rows pack) of each row's ``[x[n-1], d_1..d_k]``
        after its cache, its keys and values written at n-1..n-1+k. ``chunks``: prefill chunks riding along as rows
        without logits (a row then starts where its chunk ends); the forward's seconds are split by tokens."""
        planned = {id(state): len(chunk) for state, chunk in chunks}
        inputs = [[state.committed[-1], *draft.tokens] for draft, state in runnable]
        slots = [s.slot for _, s in runnable] + [s.slot for s, _ in chunks]
        starts = [s.cached + planned.get(id(s), 0) for _, s in runnable] + [s.cached for s, _ in chunks]
        started, cpu_started = time.perf_counter(), cpu_clock()()  # wall seconds count what else the machine runs
        logits = self.target.forward_rows(slots, starts, inputs + [c for _, c in chunks],
                                          packed_logits=self.target.packs_rows,
                                          **({"logit_rows": len(runnable)} if chunks else {}))
        if logits.is_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: time the forward, not its launch
        forward_s, tokens = time.perf_counter() - started, sum(len(x) for x in inputs)
        prefill_tokens = sum(len(chunk) for _, chunk in chunks)
        self.verify_cost = (forward_s if logits.is_cuda else cpu_clock()() - cpu_started, prefill_tokens)
        if chunks:
            self._prefilled([s for s, _ in chunks], [chunk for _, chunk in chunks],
                            forward_s * prefill_tokens / (tokens + prefill_tokens))
            forward_s *= tokens / (tokens + prefill_tokens)
        self.stats.record_batch(len(runnable), forward_s, tokens)
        seen: set[str] = set()
        for (draft, _), row in zip(runnable, inputs):  # a device's drafts after its first: their part, by tokens
            if draft.device_id in seen:
                self._debit(draft.device_id, forward_s * len(row) / tokens)
            seen.add(draft.device_id)
        return logits

    def _debit(self, device: str, seconds: float) -> None:
        self._spent_s[device] = self._spent_s.get(device, 0.0) + seconds

    def calibrate(self, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), widths: Sequence[int] = (1, 2, 4, 8),
                  context: int = 32, max_tokens: int = 256) -> list[tuple[int, int, float]]:
        """Time verification forwards on scratch slots, each batch size (those the free slots hold) at each width
        (tokens a row, k + 1) up to ``max_tokens`` a step, twice: (drafts, tokens, seconds) for the scheduler's
        cost model and the devices' price (``price.StepTable``). CPU seconds on a CPU target, as live steps are
        timed (``verify_cost``)."""
        clock = cpu_clock() if self.target.device.type == "cpu" else time.perf_counter
        room = len(self.kv.free) + self.kv.max_slots - self.kv.capacity
        sizes = [size for size in batch_sizes if size <= room]
        slots, samples = [self.kv.acquire() for _ in range(max(sizes, default=0))], []
        try:
            if slots:
                self.target.forward_rows(slots, [0] * len(slots), [[1] * context] * len(slots), logits=False)
            for _ in range(2):
                for size in sizes:
                    for width in (w for w in widths if size * w <= max(max_tokens, size * min(widths))):
                        started = clock()
                        self.target.forward_rows(slots[:size], [context] * size, [[1] * width] * size,
                                                 packed_logits=self.target.packs_rows)
                        samples.append((size, size * width, clock() - started))
        finally:
            for slot in slots:
                self.kv.release(slot)
        return samples

    def close(self, device: str, session_id: str) -> bool:
        """The edge ended this session: free its KV slot and bookkeeping now. False if it was not held."""
        state = self.sessions.get(device, session_id)
        if state is None:
            return False
        self._release(state)
        self.sessions.forget(device, session_id)
        self._snapshot()
        return True

    def _release(self, state: SessionState) -> None:
        if state.slot is not None:
            self.kv.release(state.slot)
            state.slot, state.cached = None, 0

    def _snapshot(self) -> None:
        # Read by the event loop thread for Status and stats; plain int assignments, never the table itself.
        self.active_sessions = self.sessions.active()
        self.session_count = len(self.sessions)
        self.free_sessions = self.sessions.max_sessions - self.session_count
        self.stats.evictions = self.sessions.evictions
        # Devices whose next new session would be refused, and the sessions each holds, as of this step: the
        # service refuses their other sessions' drafts on arrival. Replaced whole, never mutated.
        self.full_devices = self.sessions.full(time.monotonic())

    def fail(self, drafts: Sequence[Draft], reason: str) -> list[Outcome]:
        """A draft that fails verification on its own: refuse it and forget its session."""
        outcomes = []
        for draft in drafts:
            state = self.sessions.get(draft.device_id, draft.session_id)
            if state is not None:
                self._release(state)
            self.sessions.forget(draft.device_id, draft.session_id)
            verdict = error_verdict(self.verifier_id, draft, ErrorCode.INTERNAL, reason)
            outcomes.append(Outcome(draft.device_id, verdict, OutcomeKind.FAILED, draft))
        self._snapshot()
        return outcomes

    def _commit(self, runnable: list[Runnable], result: VerifyResult) -> list[Outcome]:
        accepted, next_tokens = result.accepted.tolist(), result.next_token.tolist()
        is_bonus, hit_eos = result.is_bonus.tolist(), result.hit_eos.tolist()
        return [Outcome(draft.device_id, self._commit_row(draft, state, accepted[row], next_tokens[row], is_bonus[row],
                                                       hit_eos[row]), OutcomeKind.VERIFIED, draft)
                for row, (draft, state) in enumerate(runnable)]

    def _commit_row(self, draft: Draft, state: SessionState, accepted: int, next_token: int,
                    is_bonus: bool, hit_eos: bool) -> Verdict:
        has_next = next_token != NO_TOKEN
        state.committed.extend(draft.tokens[:accepted])
        if has_next:
            state.committed.append(next_token)
        # The forward wrote x[n-1], d_1..d_k at positions n-1..n-1+k; committed[:-1] is a prefix of them.
        state.cached = len(state.committed) - 1
        finish = FinishReason.EOS if hit_eos else (FinishReason.LENGTH if len(state.committed) >= state.max_len else None)
        state.finished = finish is not None
        state.rounds += 1
        state.last_seq = draft.seq
        self.stats.record(len(draft.tokens), accepted)
        state.last_verdict = Verdict(
            kind=VerdictKind.VERIFIED, verifier_id=self.verifier_id, session_id=draft.session_id, seq=draft.seq,
            accepted=accepted, next_token=next_token if has_next else None,
            next_kind=(NextKind.BONUS if is_bonus else NextKind.RECOVERED) if has_next else None,
            committed_len=len(state.committed), finish=finish)
        if state.finished:
            self._release(state)  # keep the bookkeeping for retries of the last round, not the memory
        return state.last_verdict

    def _resync(self, draft: Draft) -> Verdict:
        return Verdict(kind=VerdictKind.RESYNC, verifier_id=self.verifier_id, session_id=draft.session_id,
                       seq=draft.seq, reason="verifier holds no matching state for this session; resend with context")


def error_verdict(verifier_id: str, draft: Draft | None, code: ErrorCode, reason: str, *,
                  session: str | None = None, seq: int | None = None) -> Verdict:
    """The answer to a refused message; without a decoded ``draft``, whatever ids could be read from it."""
    return Verdict(kind=VerdictKind.ERROR, verifier_id=verifier_id,
                   session_id=draft.session_id if draft else session, seq=draft.seq if draft else seq,
                   error=code, reason=reason)
