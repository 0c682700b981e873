"""The edge's asyncio/MQTT shell: one broker connection per device, many concurrent sessions.

Each round (see ARCHITECTURE.md, message flow):
  1. draft k tokens with the ONNX model (in a worker thread, so MQTT keepalives never starve), unless they
     were drafted ahead during the last round (proactive drafting, ``sled_edge.drafter.Guess``);
  2. publish the Draft and wait for its Verdict (by session and seq), resending on timeout; meanwhile draft
     the next round in a worker thread as if every token will be accepted;
  3. on resync resend with the full committed context; on `overloaded` back off and resend (or move);
     on any other error stop with the verifier's reason;
  4. commit the accepted tokens and the next token; keep the round drafted ahead if the verdict agrees
     with it, else drop it and roll the draft KV cache back; repeat.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from sled_edge.config import EdgeConfig
from sled_edge.controller import DraftLengthController
from sled_edge.connection import RECONNECTED, VERIFIER_DOWN, BrokerUnavailable, EdgeConnection
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import AheadPolicy, Drafter, Guess, Proposal
from sled_edge.placement import Placement, choose, describe
from sled_edge.session import EdgeSession
from sled_protocol import Close, Draft, ErrorCode, FinishReason, SamplingParams, Status, Verdict, VerdictKind, encode
from sled_protocol import topics
from sled_protocol.config import ConfigError
from sled_protocol.mqtt import backoff_s, parse_mqtt_urls
from sled_protocol.vocab import vocab_hash

log = structlog.get_logger("sled_edge")

MAX_RESYNCS_PER_ROUND = 3
FAILOVER_AFTER_TIMEOUTS = 2  # silent verifier: after this many unanswered sends, try another one
FAILOVER_AFTER_REFUSALS = 2  # busy verifier: after every this many "retry later" refusals, try another one
BUSY = (ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED)  # refusals that mean "not now", not "never"


class RoundObserver(Protocol):
    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None: ...


class EdgeError(RuntimeError):
    """A generation that cannot go on; ``code`` is the verifier's error code or one of ours."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]      # the committed new tokens (prompt excluded)
    text: str
    finish_reason: str | None
    seed: int | None
    rounds: int
    draft_tokens: int
    accepted_tokens: int
    mean_accepted_length: float
    acceptance_rate: float
    resyncs: int
    retries: int
    failovers: int
    proactive_guesses: int    # next rounds drafted while a round was verified
    proactive_hits: int       # of which the verdict agreed, so the round went out at once
    spec_decode: dict         # the acceptance figures under vLLM's names (SessionStats.spec_decode)
    verifier: str
    target: str | None        # identity of the target that produced every token (None: not announced)
    session_id: str
    elapsed_s: float

    def as_dict(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data.update(data.pop("spec_decode"))  # flat, beside our own names for the same counts
        data["tokens_per_s"] = round(len(self.token_ids) / self.elapsed_s, 2) if self.elapsed_s else 0.0
        return data


class EdgeDevice:
    """``async with EdgeDevice(config) as device: await device.generate(...)``."""

    def __init__(self, config: EdgeConfig, model: OnnxDraftModel | None = None,
                 observer: RoundObserver | None = None, ahead: AheadPolicy | None = None) -> None:
        from tokenizers import Tokenizer

        self.config = config
        self.observer = observer
        try:
            self.model = model or OnnxDraftModel(config.draft, config.threads, config.provider)
            self.vocab = vocab_hash(config.draft)
            self.tokenizer = Tokenizer.from_file(f"{config.draft}/tokenizer.json")
        except Exception as exc:  # a missing, corrupt or incomplete export: fix the files, do not restart
            raise ConfigError(f"cannot load draft {config.draft!r}: {exc.__class__.__name__}: {exc}") from None
        self.controller = DraftLengthController(k_max=config.max_draft_tokens)  # per device, all sessions
        self.ahead = ahead or AheadPolicy()  # whether proactive drafting pays on this device (all sessions)
        self.connection = EdgeConnection(parse_mqtt_urls(config.mqtt_url), config.device_id, config.ca_file or None,
                                         config.mqtt_protocol)
        self.verifiers = self.connection.verifiers

    async def __aenter__(self) -> EdgeDevice:
        try:
            await self.connection.start(timeout_s=self.config.discovery_timeout_s)
        except BrokerUnavailable as exc:
            raise EdgeError("broker_unreachable", str(exc)) from None
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.connection.stop()

    async def wait_closed(self) -> None:
        """Serve until cancelled (the connection reconnects by itself; it raises only if it cannot go on)."""
        await self.connection.wait_stopped()

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt``; a prompt rendered from the chat template holds its special tokens already."""
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    async def choose_verifier(self, exclude: str | None = None, min_context: int = 0,
                              session: EdgeSession | None = None) -> Status:
        """The least loaded online verifier whose vocabulary is ours (or the configured one), not ``exclude``,
        that can hold ``min_context`` tokens and, for an open ``session``, serves the very target the session
        opened on (``sled_edge.placement``). Waits up to ``discovery_timeout_s`` for one."""
        need = self._placement(exclude, min_context, session)
        timeout_s = self.config.discovery_timeout_s
        chosen = await self._await_status(lambda: choose(self.verifiers.values(), need), timeout_s)
        if chosen is None:
            raise self._unplaced(need, session)
        return chosen

    def _placement(self, exclude: str | None, min_context: int, session: EdgeSession | None) -> Placement:
        return Placement(self.vocab, min_context, self.config.verifier, exclude, pinned=session is not None,
                         target=session.target if session is not None else None)

    def _unplaced(self, need: Placement, session: EdgeSession | None) -> EdgeError:
        """Why no verifier fits ``need`` (after waiting ``discovery_timeout_s`` for one)."""
        if session is not None and choose(self.verifiers.values(), replace(need, pinned=False)):
            return EdgeError("target_unavailable", f"session {session.session_id} is pinned to target "
                             f"{session.target or '(none announced)'} (it was on {need.exclude}) and no other verifier "
                             f"serving that target came online within {self.config.discovery_timeout_s} s; "
                             f"available: {describe(self.verifiers.values())}")
        wanted = f"verifier {self.config.verifier!r}" if self.config.verifier else "a verifier"
        return EdgeError("no_verifier", f"found no {wanted} with vocabulary {self.vocab} within "
                         f"{self.config.discovery_timeout_s} s; seen: {describe(self.verifiers.values())}")

    async def _await_status(self, pick: Callable[[], Status | None], timeout_s: float) -> Status | None:
        """``pick()`` re-evaluated on every status change until it finds one, or None after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (chosen := pick()) is None and loop.time() < deadline:
            self.connection.status_changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self.connection.status_changed.wait()
            except TimeoutError:
                pass
        return chosen

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                       on_tokens: Callable[[list[int]], bool | None] | None = None,
                       sampling: SamplingParams | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``, exactly as the target would:
        its greedy output when ``sampling`` is None (or at temperature 0), else a sample from its
        distribution (the same seed gives the same output). ``on_tokens`` sees each round's newly
        committed tokens; returning True stops the generation there (finish reason "stop")."""
        started = time.perf_counter()
        verifier = await self.choose_verifier()
        max_len = len(prompt_ids) + max_new_tokens
        if verifier.max_context_tokens and max_len > verifier.max_context_tokens:
            if len(prompt_ids) >= verifier.max_context_tokens:
                raise EdgeError("too_large", f"prompt of {len(prompt_ids)} tokens fills verifier {verifier.verifier}'s "
                                f"context limit of {verifier.max_context_tokens}")
            log.warning("max_new_tokens_capped", verifier=verifier.verifier, max_context_tokens=verifier.max_context_tokens)
            max_len = verifier.max_context_tokens
        session = EdgeSession(uuid.uuid4().hex[:12], self.config.device_id, self.vocab, list(prompt_ids),
                              max_len, sampling=sampling, target=verifier.target)  # pinned to this target from now on
        slog = log.bind(device_id=session.device, session_id=session.session_id)
        drafter = Drafter(self.model)
        # A sampled session's realisation depends on where drafts start and stop, so a seed reproduces it
        # only if k does not depend on timing: it gets its own controller that learns from acceptance alone.
        seeded = sampling is not None and sampling.temperature > 0
        controller = DraftLengthController(k_max=self.config.max_draft_tokens) if seeded else self.controller
        queue: asyncio.Queue = asyncio.Queue()
        self.connection.waiters[session.session_id] = queue
        self.connection.session_verifier[session.session_id] = verifier.verifier
        guess: Guess | None = None  # the next round, drafted while this one is verified (proactive drafting)
        try:
            while session.finish is None:
                limit = max(0, min(verifier.max_draft_tokens or 64, session.budget - 1))
                k = controller.choose(limit) if self.config.draft_tokens == 0 else min(self.config.draft_tokens, limit)
                # 1. This round's draft: the guess drafted during the last round when the verdict agreed with it
                #    (and, for a seeded session, it has the k this round would have: the output follows from
                #    the seed), else drafted now.
                if guess is not None and guess.agrees(session.committed) and (guess.k == k or not seeded) \
                        and len(guess.proposal.tokens) <= limit:
                    proposal = guess.proposal
                    session.stats.guesses_sent += 1
                else:
                    if guess is not None:  # agreed, but not usable here: back to the committed prefix
                        drafter.cache.truncate(len(session.committed) - 1)
                    proposal = await asyncio.to_thread(drafter.propose_sampled, session.committed, k, sampling,
                                                       self.config.proposal_tokens)
                # 2. While it is verified, draft the next round as if every token will be accepted.
                guess, drafting_ahead = self._draft_ahead(drafter, session, proposal, controller, verifier, sampling)
                verifying = time.perf_counter()
                draft, verdict, verifier = await self._verify_round(session, proposal, queue, verifier, slog)
                if seeded or draft.context is not None:
                    # Acceptance only: for a seeded session the k sequence (and so the output) must follow from
                    # the seed; a round that carried context also timed both sides' prefill, not a round.
                    controller.observe(len(draft.tokens), verdict.accepted, len(draft.tokens) * controller.draft_s,
                                       controller.round_s)
                else:
                    controller.observe(len(draft.tokens), verdict.accepted, proposal.draft_s,
                                       time.perf_counter() - verifying)
                if draft.context is None:
                    self.ahead.observe_round(len(draft.tokens), proposal.draft_s, time.perf_counter() - verifying)
                new_tokens = session.apply(draft, verdict)
                # 3. Keep the guess if the verdict agrees with it, else drop it and roll the cache back.
                held = await self._settle(guess, drafting_ahead, drafter, session, verdict)
                if guess is not None:
                    self.ahead.observe_guess(held)
                if not held:
                    guess = None
                    drafter.learn(verdict.committed_len, draft.base_len, verdict.accepted)
                slog.debug("round_verified", seq=draft.seq, k=len(draft.tokens), accepted=verdict.accepted,
                           next_kind=str(verdict.next_kind), guessed=guess is not None)
                if on_tokens is not None and on_tokens(new_tokens):
                    session.finish = FinishReason.STOP
        finally:
            if guess is not None:  # an error or a cancel mid-round: the thread stops at its next step
                guess.abandoned = True
            del self.connection.waiters[session.session_id]
            holder = self.connection.session_verifier.pop(session.session_id)  # the current one, after any move
            if session.finish not in (FinishReason.EOS, FinishReason.LENGTH):
                await self._close(session, holder)
        new_ids = session.committed[len(prompt_ids):]
        stats = session.stats
        slog.info("generation_finished", tokens=len(new_ids), rounds=stats.rounds,
                  mean_accepted_length=round(stats.mean_accepted_length, 3), proactive_hits=stats.guesses_sent)
        return GenerationResult(
            token_ids=new_ids, text=self.decode(new_ids), finish_reason=str(session.finish),
            seed=sampling.seed if sampling is not None and sampling.temperature > 0 else None,
            rounds=stats.rounds, draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
            mean_accepted_length=round(stats.mean_accepted_length, 4), acceptance_rate=round(stats.acceptance_rate, 4),
            resyncs=stats.resyncs, retries=stats.retries, failovers=stats.failovers,
            proactive_guesses=stats.guesses, proactive_hits=stats.guesses_sent, spec_decode=stats.spec_decode(),
            verifier=verifier.verifier,
            target=session.target, session_id=session.session_id, elapsed_s=round(time.perf_counter() - started, 4),
        )

    def _draft_ahead(self, drafter: Drafter, session: EdgeSession, proposal: Proposal,
                     controller: DraftLengthController, verifier: Status,
                     sampling: SamplingParams | None) -> tuple[Guess | None, asyncio.Future | None]:
        """Start drafting the round after ``proposal`` in a worker thread, assuming the verifier accepts all of
        it; the guessed round gets the k this loop would choose after such a verdict. None when proactive
        drafting is off or does not pay here (``AheadPolicy``), or such a verdict would end the generation (an
        EOS drafted, no room left)."""
        tokens = proposal.tokens
        room = min(verifier.max_draft_tokens or 64, session.budget - len(tokens) - 1 - 1)
        if not self.config.proactive or not tokens or tokens[-1] in self.model.eos_ids or room < 1:
            return None, None
        if self.config.draft_tokens:
            k_next = min(self.config.draft_tokens, room)
        else:  # what the controller will choose after observing an all-accepted round (as a seeded one does)
            after = copy.deepcopy(controller)
            after.observe(len(tokens), len(tokens), len(tokens) * after.draft_s, after.round_s)
            k_next = after.choose(room)
        if not self.ahead.pays(k_next):
            return None, None
        guess = Guess.after(session.committed, tokens, k_next)
        session.stats.guesses += 1
        thread = asyncio.ensure_future(asyncio.to_thread(drafter.draft_ahead, guess, sampling, self.config.proposal_tokens))
        return guess, thread

    async def _settle(self, guess: Guess | None, thread: asyncio.Future | None, drafter: Drafter,
                      session: EdgeSession, verdict: Verdict) -> bool:
        """After ``verdict`` is applied: whether ``guess`` holds (its drafting thread has finished, and the
        verdict committed exactly what it assumed). A verdict that visibly disagrees stops the thread at its
        next forward pass; the thread is always awaited, so the drafter is the loop's again."""
        if guess is None:
            return False
        if verdict.finish is not None or not (guess.next_token is None or guess.next_token == verdict.next_token) \
                or len(session.committed) != len(guess.committed):
            guess.abandoned = True
        try:
            await thread
        except Exception:  # never lose the session to a guess: drop it and its cache, and draft afresh
            log.exception("draft_ahead_failed", session_id=session.session_id)
            drafter.reset()
            return False
        return not guess.abandoned and guess.agrees(session.committed)

    async def _verify_round(self, session: EdgeSession, proposal: Proposal, queue: asyncio.Queue,
                            verifier: Status, slog) -> tuple[Draft, Verdict, Status]:
        """Publish this round's draft until a verdict for it arrives; resend on timeout, move to another
        verifier of the same target when ours goes offline, keeps silent or keeps refusing as busy (backing
        off meanwhile), resend with context on resync."""
        draft = session.draft(proposal.tokens, proposal.sparse)
        resends = resyncs = refusals = 0
        busy_since: float | None = None  # when the verifiers began answering "retry later" to this round
        stranded: EdgeError | None = None  # the last move refused because no one else serves our target
        while True:
            # A broker outage is not the verifier's silence: wait for the connection (bounded) without
            # counting resends or moving the session; the round is resent once the broker is back.
            try:
                async with asyncio.timeout(self.config.outage_timeout_s):
                    await self.connection.connected.wait()
            except TimeoutError:
                raise EdgeError("broker_unreachable", f"no broker connection for {self.config.outage_timeout_s} s") from None
            announced = self.verifiers.get(verifier.verifier)
            if announced is not None and announced.online and announced.target != session.target:
                # The id now serves another target (restarted with a new model): never send this session there.
                moved_to, draft, refusal = await self._failover(session, proposal, verifier, slog)
                if moved_to is verifier:
                    raise EdgeError("target_unavailable", f"verifier {verifier.verifier} now serves target "
                                    f"{announced.target}, not the session's {session.target}; {refusal.detail}")
                verifier, resends = moved_to, 0
                continue
            sent_s = time.perf_counter()
            try:
                topic = topics.draft_topic(verifier.verifier, session.device)
                await self.connection.publish(topic, encode(draft), self.config.timeout_s)
            except TimeoutError:
                continue  # the connection dropped while publishing: wait for it above
            try:
                verdict = await self._await_verdict(queue, draft.seq, verifier.verifier)
            except TimeoutError:
                verdict = None
            if verdict is None or verdict is VERIFIER_DOWN:
                if verdict is None:
                    resends += 1
                    session.stats.retries += 1
                    if resends > self.config.retries:
                        silent = (f"no verdict from {verifier.verifier} for round {draft.seq} after {resends} tries "
                                  f"of {self.config.timeout_s} s")
                        if stranded is not None:  # others were online, but none serves the session's target
                            raise EdgeError(stranded.code, f"{silent}; {stranded.detail}") from None
                        raise EdgeError("verifier_timeout", silent) from None
                    slog.warning("verdict_timeout", seq=draft.seq, resend=resends, verifier=verifier.verifier)
                if verdict is VERIFIER_DOWN or resends >= FAILOVER_AFTER_TIMEOUTS:
                    moved_to, draft, refusal = await self._failover(session, proposal, verifier, slog)
                    stranded = refusal if refusal is not None and refusal.code == "target_unavailable" else None
                    if moved_to is not verifier:
                        verifier, resends = moved_to, 0  # the new verifier gets its own tries
                continue
            if verdict is RECONNECTED:
                continue  # the broker came back: the draft or its verdict may be lost, resend now
            if verdict.kind is VerdictKind.VERIFIED:
                if self.observer is not None:
                    committed = verdict.accepted + (verdict.next_token is not None)
                    self.observer.round_done(len(draft.tokens), verdict.accepted, committed, time.perf_counter() - sent_s)
                return draft, verdict, verifier
            if verdict.kind is VerdictKind.ERROR and verdict.error in BUSY:
                # Not now: back off and resend, or move; give up only after the outage budget.
                busy_since = busy_since if busy_since is not None else time.monotonic()
                if time.monotonic() - busy_since > self.config.outage_timeout_s:
                    raise EdgeError(str(verdict.error), f"verifier {verifier.verifier} still refuses round {draft.seq} "
                                    f"after {self.config.outage_timeout_s} s: {verdict.reason}")
                refusals += 1
                slog.info("verifier_busy", seq=draft.seq, error=str(verdict.error), verifier=verifier.verifier,
                          refusals=refusals)
                if refusals % FAILOVER_AFTER_REFUSALS == 0:
                    moved_to, draft, _ = await self._failover(session, proposal, verifier, slog)
                    if moved_to is not verifier:
                        verifier, resends = moved_to, 0
                        continue  # a fresh verifier: try it now (the backoff keeps growing if it is busy too)
                # Jittered, so devices refused together do not come back together.
                await asyncio.sleep(backoff_s(refusals - 1, base_s=0.05, cap_s=2.0) * random.uniform(0.5, 1.0))
                continue
            if verdict.kind is VerdictKind.ERROR and verdict.error is not ErrorCode.INTERNAL:
                raise EdgeError(str(verdict.error), verdict.reason or "refused by the verifier")
            # RESYNC, or INTERNAL (the verifier failed on this round and forgot the session): resend with context.
            resyncs += 1
            session.stats.resyncs += 1
            if resyncs > MAX_RESYNCS_PER_ROUND:
                raise EdgeError("resync_loop", f"verifier {verifier.verifier} asked for resync {resyncs} times in one round")
            slog.info("session_resync", seq=draft.seq, reason=verdict.reason, verifier=verifier.verifier)
            session.send_context = True
            draft = session.draft(proposal.tokens, proposal.sparse)

    async def _close(self, session: EdgeSession, verifier_id: str) -> None:
        """Best effort: tell the verifier a session it still holds has ended (stop, cancel or error)."""
        message = encode(Close(device=session.device, session=session.session_id))
        try:
            await self.connection.publish(topics.draft_topic(verifier_id, session.device), message, timeout_s=1.0)
        except TimeoutError:  # the broker is away; the verifier's LRU reclaims the session later
            log.debug("close_not_sent", session_id=session.session_id)

    async def _failover(self, session: EdgeSession, proposal: Proposal, current: Status,
                        slog) -> tuple[Status, Draft, EdgeError | None]:
        """Move the session to another verifier serving its target, with its full committed history (the new
        one prefills it). When there is none, stay on ``current`` (the refusal says why): at once while it is
        online for the session's target (a lone verifier is retried without waiting out discovery), else
        once it comes back or ``discovery_timeout_s`` has passed."""
        need = self._placement(current.verifier, session.max_len, session)

        def other_or_ours_back() -> Status | None:
            other = choose(self.verifiers.values(), need)
            ours = self.verifiers.get(current.verifier)
            return other or (ours if ours is not None and ours.online and ours.target == session.target else None)

        chosen = await self._await_status(other_or_ours_back, self.config.discovery_timeout_s)
        if chosen is None or chosen.verifier == current.verifier:
            refusal = self._unplaced(need, session)
            slog.warning("session_not_moved", seq=session.seq, verifier=current.verifier, reason=refusal.detail)
            return current, session.draft(proposal.tokens, proposal.sparse), refusal
        session.stats.failovers += 1
        session.send_context = True
        self.connection.session_verifier[session.session_id] = chosen.verifier
        slog.warning("session_failover", seq=session.seq, old=current.verifier, new=chosen.verifier,
                     target=session.target)
        return chosen, session.draft(proposal.tokens, proposal.sparse), None

    async def _await_verdict(self, queue: asyncio.Queue, seq: int, verifier_id: str):
        """``verifier_id``'s verdict for round ``seq``, or a connection sentinel; TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(self.config.timeout_s):
            while True:
                item = await queue.get()
                if item is RECONNECTED or item is VERIFIER_DOWN or (item.seq == seq and item.verifier == verifier_id):
                    return item  # anything else is a duplicate, a stale round's or a former verifier's answer
