"""One verification step: admit drafts, prefill new sessions, score all in ONE pass, decide, commit.

Synchronous and single-threaded by design: the service runs ``step`` in its one model thread, so
session state and KV caches are never shared between threads. Each session's KV cache is a slot of
the target's ``SlotKV``; ``SessionState.cached`` counts its valid positions (always committed[:-1]
once prefilled), so committing a round is moving that count, and a rejected draft costs no copy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sled_protocol import Draft, ErrorCode, FinishReason, NextKind, Verdict, VerdictKind
from sled_protocol.messages import STREAM_VERIFY, round_seed
from sled_verifier.sessions import Admission, SessionState, SessionTable
from sled_verifier.stats import VerifierStats
from sled_verifier.runtime import TargetRuntime
from sled_verifier.sampling import rejection_sample, warp_probs
from sled_verifier.verify import VerifyResult, greedy_verify


@dataclass(frozen=True)
class Outcome:
    device: str
    verdict: Verdict | None  # None: nothing to send (a stale round, or a draft deferred to a later step)
    admission: Admission
    draft: Draft             # the draft this answers (a deferred one goes back to the queue as it is)


class VerifierEngine:
    def __init__(self, target: TargetRuntime, verifier_id: str, max_sessions: int, stats: VerifierStats,
                 max_context: int = 4096, prefill_chunk: int = 256) -> None:
        self.target = target
        self.prefill_chunk = prefill_chunk  # prefill tokens per step, all new sessions together
        # A few spare slots: a batch may briefly open sessions before their LRU victims are released.
        self.kv = target.init_kv(max_slots=max_sessions + 64, max_length=max_context)
        self.verifier_id = verifier_id
        self.sessions = SessionTable(max_sessions=max_sessions)
        self.stats = stats
        self.active_sessions = 0
        self.session_count = 0

    def step(self, drafts: Sequence[Draft]) -> list[Outcome]:
        """Verify ``drafts``. If it raises, no session's committed tokens or cache have changed (sessions
        opened from a context may exist, consistently, without their prefill), so the batch can be retried.
        A draft whose session's prefill does not fit this step comes back ``DEFERRED``: step it again."""
        started_step = time.perf_counter()
        try:
            return self._step(drafts)
        finally:
            self.stats.step_s += time.perf_counter() - started_step

    def step_until_answered(self, drafts: Sequence[Draft]) -> list[Outcome]:
        """``step``, then again for deferred drafts until each has its outcome; outcomes in ``drafts`` order.
        For callers without a queue of their own (tests, benchmarks); the service re-queues instead."""
        outcomes = {id(o.draft): o for o in self.step(drafts)}
        while deferred := [o.draft for o in outcomes.values() if o.admission is Admission.DEFERRED]:
            outcomes.update((id(o.draft), o) for o in self.step(deferred))
        return [outcomes[id(d)] for d in drafts]

    def _step(self, drafts: Sequence[Draft]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        runnable: list[tuple[Draft, SessionState]] = []
        batch_keys = frozenset((d.device, d.session) for d in drafts)
        seen: set[tuple[str, str]] = set()
        # 1. Answer what needs no model: a second draft of a session in this step, retries, stale rounds,
        #    unknown or diverged sessions.
        for draft in drafts:
            if (draft.device, draft.session) in seen:
                verdict = error_verdict(self.verifier_id, draft, ErrorCode.MALFORMED,
                                        "a second draft of this session in one step; one round at a time")
                outcomes.append(Outcome(draft.device, verdict, Admission.STALE, draft))
                continue
            seen.add((draft.device, draft.session))
            admission = self.sessions.admit(draft)
            state = self.sessions.get(draft.device, draft.session)
            if admission is Admission.RESEND:
                outcomes.append(Outcome(draft.device, state.last_verdict, admission, draft))
            elif admission is Admission.STALE:
                outcomes.append(Outcome(draft.device, None, admission, draft))
            elif admission is Admission.RESYNC:
                self.stats.resyncs += 1
                outcomes.append(Outcome(draft.device, self._resync(draft), admission, draft))
            elif admission is Admission.FINISHED:
                verdict = error_verdict(self.verifier_id, draft, ErrorCode.SESSION_FINISHED,
                                        "session already finished; open a new one")
                outcomes.append(Outcome(draft.device, verdict, admission, draft))
            else:
                if admission is Admission.REBUILD:
                    state, dropped = self.sessions.open(draft, protected=batch_keys)
                    for old in dropped:
                        self._release(old)
                self.sessions.touch(state)
                runnable.append((draft, state))
        if not runnable:
            self._snapshot()
            return outcomes
        # 2. Prefill sessions that were just opened or rebuilt (their cache covers x[0:n-1]), within this
        #    step's prefill budget; those not complete wait for a later step, the others go on now.
        incomplete = self._prefill([state for _, state in runnable])
        if incomplete:
            self.stats.deferred += len(incomplete)
            outcomes += [Outcome(d.device, None, Admission.DEFERRED, d) for d, s in runnable if id(s) in incomplete]
            runnable = [(d, s) for d, s in runnable if id(s) not in incomplete]
            if not runnable:
                self._snapshot()
                return outcomes
        # 3. One batched forward over [x[n-1], d_1..d_k] of every runnable session, written into its slot.
        inputs = [[state.committed[-1], *draft.tokens] for draft, state in runnable]
        started = time.perf_counter()
        logits = self.target.forward_rows([s.slot for _, s in runnable], [s.cached for _, s in runnable], inputs)
        if logits.is_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: time the forward, not its launch
        self.stats.record_batch(len(runnable), time.perf_counter() - started, sum(len(x) for x in inputs))
        # 4. Verification, vectorised over the batch: greedy rows by argmax, sampled rows by rejection sampling.
        started = time.perf_counter()
        result = self._decide(runnable, logits)
        # 5. Commit and answer; the cache now covers committed[:-1] by moving a count.
        accepted = result.accepted.tolist()
        next_tokens = result.next_token.tolist()
        for row, (draft, state) in enumerate(runnable):
            verdict = self._commit(draft, state, accepted[row], next_tokens[row],
                                   bool(result.is_bonus[row]), bool(result.hit_eos[row]))
            outcomes.append(Outcome(draft.device, verdict, Admission.RUN, draft))
        self.stats.decide_s += time.perf_counter() - started
        self._snapshot()
        return outcomes

    def _prefill(self, states: list[SessionState]) -> set[int]:
        """Move sessions' caches towards committed[:-1] in ONE forward of at most ``prefill_chunk`` tokens in
        all (oldest first; a long context takes several steps), so a step's time stays bounded and new
        sessions never stall the fleet. Returns the ``id`` of every state still incomplete."""
        for state in states:
            if state.slot is None:
                state.slot, state.cached = self.kv.acquire(), 0
        budget, rows, chunks = self.prefill_chunk, [], []
        for state in states:
            missing = len(state.committed) - 1 - state.cached
            if missing > 0 and budget > 0:
                rows.append(state)
                chunks.append(state.committed[state.cached : state.cached + min(missing, budget)])
                budget -= len(chunks[-1])
        if rows:
            started = time.perf_counter()
            self.target.forward_rows([s.slot for s in rows], [s.cached for s in rows], chunks, logits=False)
            self.stats.prefill_s += time.perf_counter() - started
            for state, chunk in zip(rows, chunks):
                state.cached += len(chunk)
                self.stats.prefill_tokens += len(chunk)
        return {id(s) for s in states if s.cached < len(s.committed) - 1}

    def calibrate(self, batch_sizes: Sequence[int] = (1, 8, 32), draft_tokens: int = 4,
                  context: int = 32) -> list[tuple[int, int, float]]:
        """Time verification forwards of a few batch sizes on scratch slots: (drafts, tokens, seconds) for the
        scheduler's cost model, so it starts from this hardware's figures rather than a guess."""
        samples = []
        for size in batch_sizes:
            if size > len(self.kv.free) + self.kv.max_slots - self.kv.capacity:
                break
            slots = [self.kv.acquire() for _ in range(size)]
            try:
                self.target.forward_rows(slots, [0] * size, [[1] * context] * size)
                rows = [[1] * (draft_tokens + 1)] * size
                for _ in range(2):
                    started = time.perf_counter()
                    self.target.forward_rows(slots, [context] * size, rows)
                    samples.append((size, size * (draft_tokens + 1), time.perf_counter() - started))
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

    def fail(self, drafts: Sequence[Draft], reason: str) -> list[Outcome]:
        """A draft that fails verification on its own: refuse it and forget its session."""
        outcomes = []
        for draft in drafts:
            state = self.sessions.get(draft.device, draft.session)
            if state is not None:
                self._release(state)
            self.sessions.forget(draft.device, draft.session)
            verdict = error_verdict(self.verifier_id, draft, ErrorCode.INTERNAL, reason)
            outcomes.append(Outcome(draft.device, verdict, Admission.RESYNC, draft))
        self._snapshot()
        return outcomes

    def _commit(self, draft: Draft, state: SessionState, accepted: int, next_token: int,
                is_bonus: bool, hit_eos: bool) -> Verdict:
        state.committed.extend(draft.tokens[:accepted])
        if next_token >= 0:
            state.committed.append(next_token)
        # The forward wrote x[n-1], d_1..d_k at positions n-1..n-1+k; committed[:-1] is a prefix of them.
        state.cached = len(state.committed) - 1
        finish = FinishReason.EOS if hit_eos else (FinishReason.LENGTH if len(state.committed) >= state.max_len else None)
        state.finished = finish is not None
        state.rounds += 1
        state.last_seq = draft.seq
        self.stats.record_draft(len(draft.tokens), accepted)
        state.last_verdict = Verdict(
            kind=VerdictKind.VERIFIED, verifier=self.verifier_id, session=draft.session, seq=draft.seq,
            accepted=accepted, next_token=next_token if next_token >= 0 else None,
            next_kind=(NextKind.BONUS if is_bonus else NextKind.RECOVERED) if next_token >= 0 else None,
            committed_len=len(state.committed), finish=finish,
        )
        if state.finished:
            self._release(state)  # keep the bookkeeping for retries of the last round, not the memory
        return state.last_verdict

    def _decide(self, runnable, logits: torch.Tensor) -> VerifyResult:
        draft_ids, lens = self._padded(runnable)
        budgets, eos_ids = self._budgets(runnable), self.target.eos_ids
        result = greedy_verify(draft_ids, lens, logits.argmax(dim=-1), budgets, eos_ids)
        sampled = [row for row, (draft, _) in enumerate(runnable) if _is_sampled(draft)]
        if not sampled:
            return result
        drafts = [runnable[row][0] for row in sampled]
        rows = torch.tensor(sampled, device=self.target.device)
        k_max = max(1, draft_ids.shape[1])
        logits = logits[rows, : k_max + 1]                                            # [R, K+1, V]
        positions = logits.shape[1]
        params = [torch.tensor([getattr(d.sampling, name) for d in drafts], device=self.target.device)
                  for name in ("temperature", "top_k", "top_p")]
        probs = warp_probs(logits.reshape(-1, logits.shape[-1]),
                           *(param.repeat_interleave(positions) for param in params)).reshape(logits.shape)
        q_ids, q_probs = self._proposals(drafts, k_max)
        uniforms = torch.stack([
            torch.rand(k_max + 1, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(round_seed(d.sampling.seed, d.base_len, STREAM_VERIFY)))
            for d in drafts
        ]).to(self.target.device)                                                      # [R, K+1]
        padded_ids = draft_ids if draft_ids.shape[1] else draft_ids.new_full((len(runnable), 1), -1)
        sampled_result = rejection_sample(probs, padded_ids[rows], lens[rows], q_ids, q_probs, uniforms,
                                          budgets[rows], eos_ids)
        merged = {}
        for name in ("accepted", "next_token", "is_bonus", "hit_eos"):
            value = getattr(result, name).clone()
            value[rows] = getattr(sampled_result, name)
            merged[name] = value
        return VerifyResult(**merged)

    def _proposals(self, drafts: Sequence[Draft], k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded sparse proposals [R, K, M]; q' = the sent float32 values over their sum (as the edge
        sampled); a draft without one is the point mass on its token (token-only rule)."""
        m = max((len(row) for d in drafts if d.q_ids for row in d.q_ids), default=1)
        no_row = ([0] * m, [0.0] * m)
        id_rows, prob_rows = [], []
        for draft in drafts:
            if draft.q_ids is None:  # point mass: q'(d_j) = 1
                rows = [([t] + [0] * (m - 1), [1.0] + [0.0] * (m - 1)) for t in draft.tokens]
            else:
                rows = [(list(i) + [0] * (m - len(i)), list(q) + [0.0] * (m - len(q)))
                        for i, q in zip(draft.q_ids, draft.q_probs)]
            rows += [no_row] * (k_max - len(rows))
            id_rows.append([row[0] for row in rows])
            prob_rows.append([row[1] for row in rows])
        ids = torch.tensor(id_rows, dtype=torch.int64)                                  # [R, K, M]
        probs = torch.tensor(prob_rows, dtype=torch.float32).double()                   # [R, K, M]
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-300)
        return ids.to(self.target.device), probs.to(self.target.device)

    def _padded(self, runnable) -> tuple[torch.Tensor, torch.Tensor]:
        k_max = max(len(draft.tokens) for draft, _ in runnable)
        padded = [[*draft.tokens] + [-1] * (k_max - len(draft.tokens)) for draft, _ in runnable]
        draft_ids = torch.tensor(padded, dtype=torch.int64, device=self.target.device).reshape(len(runnable), k_max)
        lens = torch.tensor([len(draft.tokens) for draft, _ in runnable], dtype=torch.int64, device=self.target.device)
        return draft_ids, lens

    def _budgets(self, runnable) -> torch.Tensor:
        budgets = [state.max_len - len(state.committed) for _, state in runnable]
        return torch.tensor(budgets, dtype=torch.int64, device=self.target.device)

    def _resync(self, draft: Draft) -> Verdict:
        return Verdict(kind=VerdictKind.RESYNC, verifier=self.verifier_id, session=draft.session, seq=draft.seq,
                       reason="verifier holds no matching state for this session; resend with context")


def _is_sampled(draft: Draft) -> bool:
    return draft.sampling is not None and draft.sampling.temperature > 0


def error_verdict(verifier_id: str, draft: Draft | None, code: ErrorCode, reason: str, *,
                  session: str | None = None, seq: int | None = None) -> Verdict:
    """The answer to a refused message; without a decoded ``draft``, whatever ids could be read from it."""
    return Verdict(kind=VerdictKind.ERROR, verifier=verifier_id,
                   session=draft.session if draft else session, seq=draft.seq if draft else seq,
                   error=code, reason=reason)
