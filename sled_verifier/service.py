"""The verifier's asyncio/MQTT shell: receive drafts, batch them, run the engine off the loop, answer.

Tasks (one TaskGroup per broker connection; ``sled_protocol.connection`` reconnects with backoff, on the
transport the URL names: MQTT, or ``memory://`` in tests):
  receive  - decode and validate each draft; refuse bad ones with an error verdict at once
  schedule - ask the scheduler (``sled_verifier.scheduler``) when to step; take drafts from the queue
             (``sled_verifier.draft_queue``); run ``VerifierEngine.step`` in the model thread; answer, and put
             drafts whose prefill did not fit the step back at the head of the queue
  report   - log aggregated stats every ``stats_interval_s``
  announce - republish the retained Status every ``status_interval_s``: where retained messages are
             node-local (a RabbitMQ cluster), edges on other nodes learn of this verifier only this way
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import structlog

from sled_protocol import Close, Draft, ErrorCode, Limits, ProtocolError, Status, Verdict, VerdictKind, encode
from sled_protocol.codec import decode_inbound, peek_ids
from sled_protocol import topics
from sled_protocol.connection import Reconnecting
from sled_protocol.transport import Link, TransportError, Will, parse_broker_urls, transport_for
from sled_verifier.config import VerifierConfig
from sled_verifier.draft_queue import DraftQueue, Offer, Queued
from sled_verifier.engine import Outcome, OutcomeKind, VerifierEngine, error_verdict
from sled_verifier.price import LivePrice
from sled_verifier.scheduler import Arrivals, SchedulePolicy, StepCost, WakeGate, batch_size, plan
from sled_verifier.ratelimit import RateLimiter

log = structlog.get_logger("sled_verifier")

EXPECT_FORGET_S = 60.0  # a session silent this long is no longer waited for
MAX_REASON_CHARS = 500  # a refusal's reason, sent back and logged
REFUSAL_BURST_S = 4.0  # a device's refusal budget holds this many seconds' worth (20 at the default 5/s)


@dataclass(frozen=True)
class Refusal:
    """Why one inbound message is refused, and whom to tell: its draft when decoded, else the ids read from it."""

    code: ErrorCode
    reason: str
    session: str | None = None
    seq: int | None = None
    draft: Draft | None = None
    cause: Exception | None = None  # an unexpected failure: its traceback goes with the log line


class VerifierService:
    def __init__(self, config: VerifierConfig, engine: VerifierEngine, vocab: str,
                 target_identity: str | None = None) -> None:
        self.config, self.engine, self.vocab = config, engine, vocab
        self.target_identity = target_identity  # announced in every Status; edges pin sessions to it
        self.stats = engine.stats
        self.policy = SchedulePolicy.from_config(config)
        self.cost = StepCost()
        # What devices are told a draft and a token cost (Status.step_cost, ``sled_verifier.price``): the step table
        # the service calibrates at start, read at the load of its recent verification steps.
        self.pricing = LivePrice()
        self.arrivals = Arrivals(max_sessions=config.max_sessions, forget_s=EXPECT_FORGET_S,
                                 rhythm_of=lambda key: key[0])  # keys are (device, session): a device's rhythm
        self.idle_since_s = 0.0  # when the last step ended: the scheduler's wait budget counts from here at most
        self.wake_lag_s = 0.001  # how late the event loop wakes the scheduler (mean); kept in hand before deadlines
        max_context = min(config.max_context_tokens, engine.target.max_positions or config.max_context_tokens)
        if max_context < config.max_context_tokens:
            log.warning("max_context_capped", configured=config.max_context_tokens, model_positions=max_context)
        self.limits = Limits(config.max_message_bytes, config.max_draft_tokens, max_context, engine.target.vocab_size)
        # One per session (a newer round replaces an older), at most device_max_drafts of one device.
        self.queue = DraftQueue(max_drafts=config.max_sessions, device_max_drafts=config.device_max_drafts,
                                device_step_tokens=config.device_step_tokens)
        self.steps = 0  # steps begun: the unit fairness is measured in (draft_answered's steps_waited)
        self.arrived = asyncio.Event()
        self.gate = WakeGate()  # which arrivals wake the scheduler's wait
        self._closing: set[asyncio.Future] = set()  # engine.close calls in flight (kept referenced)
        self.rate = RateLimiter(config.max_drafts_per_s, burst=max(1.0, 2 * config.max_drafts_per_s),
                                max_devices=4 * config.max_sessions)
        self.byte_rate = RateLimiter(config.max_bytes_per_s, max_devices=4 * config.max_sessions,
                                     burst=max(float(self.limits.max_message_bytes), 2 * config.max_bytes_per_s))
        # Refusals answered and logged per device: an honest device (a few sessions, backing off) stays well inside;
        # a flood beyond it is only counted (VerifierStats.refusals_suppressed).
        self.refusals = RateLimiter(config.max_refusals_per_s, burst=max(1.0, REFUSAL_BURST_S * config.max_refusals_per_s),
                                    max_devices=4 * config.max_sessions)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sled-model")

    def status(self, online: bool) -> Status:
        return Status(
            verifier_id=self.config.verifier_id, online=online, model=self.engine.target.model_id, vocab=self.vocab,
            vocab_size=self.engine.target.vocab_size, load=self.engine.active_sessions,
            capacity=self.engine.sessions.max_sessions, max_draft_tokens=self.config.max_draft_tokens,
            max_context_tokens=self.limits.max_context_tokens, target=self.target_identity,
            step_cost=self.step_cost(), free_sessions=self.engine.free_sessions,
        )

    def step_cost(self) -> tuple[float, float, float, float] | None:
        """``Status.step_cost``: the step table's price at the recent load (``LivePrice``); None: no price."""
        return self.pricing.announce()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled, reconnecting to the broker (the next of a cluster's nodes) with backoff."""
        self.stats.loop_thread = threading.get_ident()  # its CPU clock (sled_verifier_loop_cpu_seconds)
        self.pricing.start(self.stats.outside_model_s())
        transports = [transport_for(address, ca_file=self.config.ca_file or None, protocol=self.config.mqtt_protocol)
                      for address in parse_broker_urls(self.config.mqtt_url)]
        will = Will(topics.status_topic(self.config.verifier_id), encode(self.status(False)),
                    qos=topics.QOS_STATUS, retain=topics.RETAIN_STATUS)
        connection = Reconnecting(transports, f"sled-verifier-{self.config.verifier_id}", will=will, log=log,
                                  subscriptions=[(topics.drafts_filter(self.config.verifier_id), topics.QOS_DRAFT)])
        await connection.run(lambda link: self._serve_connection(link, ready))

    async def _serve_connection(self, client: Link, ready: asyncio.Event | None) -> None:
        status_topic = topics.status_topic(self.config.verifier_id)
        await client.publish(status_topic, encode(self.status(True)), qos=topics.QOS_STATUS, retain=True)
        log.info("verifier_online", verifier=self.config.verifier_id, model=self.engine.target.model_id,
                 vocab=self.vocab, drafts=topics.drafts_filter(self.config.verifier_id))
        if ready is not None:
            ready.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._receive(client), name="receive")
                group.create_task(self._schedule(client), name="schedule")
                group.create_task(self._report(), name="report")
                group.create_task(self._announce(client), name="announce")
        finally:
            if asyncio.current_task().cancelling():
                # Shutting down: say so now rather than leave edges to wait for the will.
                try:
                    async with asyncio.timeout(1.0):
                        await client.publish(status_topic, encode(self.status(False)), qos=topics.QOS_STATUS, retain=True)
                except (TransportError, TimeoutError):
                    pass

    async def _receive(self, client: Link) -> None:
        async for message in client.messages():
            device = topics.device_of_draft_topic(message.topic)
            if device is None:
                continue
            if message.retain:
                # Planted before we subscribed (a device may retain on its own drafts topic): never acted on, or
                # one poisoned message would be replayed to every verifier at every start.
                self.stats.retained_ignored += 1
                self._log_refusal(device, "retained_draft_ignored", time.monotonic(), bytes=len(message.payload))
                continue
            started = time.perf_counter()
            await self._accept(client, device, message.payload, time.monotonic())
            self.stats.receive_s += time.perf_counter() - started

    async def _accept(self, client: Link, device: str, payload: bytes, now_s: float) -> None:
        """Admit one inbound message, or refuse it. Any failure here is this message's refusal (its sender is
        told, with its session and seq where they can be read), never the service's end."""
        try:
            refusal = self._admit(device, payload, now_s)
        except Exception as exc:  # noqa: BLE001 - a bug or an input nobody foresaw: refuse this message only
            refusal = Refusal(ErrorCode.MALFORMED, f"message refused: {exc.__class__.__name__}: {exc}",
                              *peek_ids(payload)[1:], cause=exc)
        if refusal is not None:
            await self._refuse(client, device, refusal.draft, refusal.code, refusal.reason, session=refusal.session,
                               seq=refusal.seq, cause=refusal.cause)

    def _admit(self, device: str, payload: bytes, now_s: float) -> Refusal | None:
        """Decode, check and queue one message; the refusal to send, if any."""
        if not self.rate.allow(device, now_s):
            return Refusal(ErrorCode.RATE_LIMITED, f"more than {self.config.max_drafts_per_s:g} drafts/s from this "
                           "device", *peek_ids(payload)[1:])
        if not self.byte_rate.allow(device, now_s, cost=len(payload)):
            return Refusal(ErrorCode.RATE_LIMITED, f"more than {self.config.max_bytes_per_s:g} bytes/s from this "
                           "device", *peek_ids(payload)[1:])
        held = self.engine.full_devices.get(device)
        queue_full = self.queue.queued_of(device) >= self.queue.device_max_drafts
        if held is not None or queue_full:  # its device holds a quota: a new session is refused before the decode
            tag, session, seq = peek_ids(payload)  # (a context's tokens are most of the cost of a message)
            if tag == "draft" and session is not None and held is not None and session not in held:
                return Refusal(ErrorCode.OVERLOADED, f"this device holds its {self.config.device_max_sessions} "
                               "sessions; retry later", session, seq)
            if tag == "draft" and session is not None and queue_full and (device, session) not in self.queue:
                return Refusal(ErrorCode.OVERLOADED, f"this device has {self.queue.device_max_drafts} drafts queued; "
                               "retry later", session, seq)
        try:
            draft = decode_inbound(payload, self.limits)  # parsed once: a Draft, or a Close
        except ProtocolError as exc:
            session, seq = (exc.session_id, exc.seq) if exc.session_id is not None else peek_ids(payload)[1:]
            return Refusal(exc.code, str(exc), session, seq)
        if isinstance(draft, Close):
            self._close(device, draft)
            return None
        if draft.device_id != device:
            return Refusal(ErrorCode.WRONG_DEVICE, f"draft names device {draft.device_id!r} but was published on "
                           f"{device!r}'s topic", draft=draft)
        if draft.vocab != self.vocab:
            return Refusal(ErrorCode.VOCAB_MISMATCH, f"draft vocabulary {draft.vocab} differs from the target's "
                           f"{self.vocab}", draft=draft)
        offer = self.queue.offer(draft, now_s, self.steps)
        if offer is Offer.FULL:
            return Refusal(ErrorCode.OVERLOADED, "verification queue is full; retry later", draft=draft)
        if offer is Offer.DEVICE_FULL:
            return Refusal(ErrorCode.OVERLOADED, f"this device has {self.config.device_max_drafts} drafts queued; "
                           "retry later", draft=draft)
        if offer is Offer.QUEUED:
            self.arrivals.arrived((device, draft.session_id), now_s)
            gap_s = self.arrivals.gap_s((device, draft.session_id))
            if self.gate.wakes(len(self.queue), gap_s, self.arrivals.waiting):
                self.arrived.set()
        return None  # Offer.LATE: an older round arrived late; the newer one is already queued.

    def _close(self, device: str, close: Close) -> None:
        if close.device_id != device:
            return  # a device closes only its own sessions
        key = (device, close.session_id)
        self.queue.drop(key)
        self.arrivals.forget(key)  # no draft is coming: the scheduler need not wait for it
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(self.model_thread, self.engine.close, device, close.session_id)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.debug("session_closed", device_id=device, session_id=close.session_id)

    async def _refuse(self, client: Link, device: str, draft: Draft | None, code: ErrorCode, reason: str, *,
                      session: str | None = None, seq: int | None = None, cause: Exception | None = None) -> None:
        reason = reason if len(reason) <= MAX_REASON_CHARS else f"{reason[:MAX_REASON_CHARS - 3]}..."
        verdict = error_verdict(self.config.verifier_id, draft, code, reason, session=session, seq=seq)
        self.stats.errors[str(code)] += 1
        if not self._log_refusal(device, "draft_refused", time.monotonic(), session_id=verdict.session_id,
                                 seq=verdict.seq, error=str(code), reason=reason,
                                 **({"exc_info": cause} if cause is not None else {})):
            return  # over this device's refusal budget: counted, neither logged nor answered
        await self._publish_verdict(client, device, verdict)

    def _log_refusal(self, device: str, event: str, now_s: float, **fields) -> bool:
        """One warning line per refusal while ``device`` is within its refusal budget; beyond it the refusal is only
        counted (``refusals_suppressed``), so a flood of bad messages floods neither the journal nor the broker."""
        if not self.refusals.allow(device, now_s):
            self.stats.refusals_suppressed += 1
            return False
        log.warning(event, device_id=device[:80], **fields)
        return True

    async def _publish_verdict(self, client: Link, device: str, verdict: Verdict) -> None:
        started = time.perf_counter()
        if (message := self._verdict_message(device, verdict)) is not None:
            await client.publish(*message, qos=topics.QOS_VERDICT)
        self.stats.publish_s += time.perf_counter() - started

    def _verdict_message(self, device: str, verdict: Verdict) -> tuple[str, bytes] | None:
        """The (topic, payload) that answers ``device``; None where its id cannot be a topic (logged)."""
        try:
            topic = topics.verdict_topic(device)
        except ValueError:
            log.warning("verdict_undeliverable", device_id=device[:80], reason="device id is not a valid topic level")
            return None
        if verdict.kind is VerdictKind.VERIFIED and self.target_identity is not None:
            verdict = replace(verdict, target=self.target_identity)  # what the edge checks against its session's pin
        return topic, encode(verdict)

    async def _schedule(self, client: Link) -> None:
        while True:
            # A cancellation this loop swallowed (seen after floods on Python 3.11: the task still cancelling,
            # waiting for an arrival that never came, so SIGTERM never stopped the verifier) ends it here.
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError
            # 1. Ask the scheduler: step now, or wait for predicted arrivals (woken early by any arrival).
            now_s = time.monotonic()
            started = time.perf_counter()
            # Devices over their share of the verifier's time add one draft to the next step (FairShare).
            self.queue.over_share(self.engine.fair.over_share(self.queue.devices(), self._active_devices()))
            expected = self.arrivals.expected_rounds(now_s)  # (when, the session's gap): waits weigh round times
            queue = self.queue.state(self.idle_since_s, self.config.max_prefill_tokens, gap_of=self.arrivals.gap_s)
            decided = plan(self.policy, queue, [at for at, _ in expected], self.cost, now_s, slack_s=self.wake_lag_s,
                           gaps_s=[gap for _, gap in expected])
            self.gate.arm(len(self.queue), decided)  # which arrivals wake the wait (not every one: issue 22)
            self.stats.schedule_s += time.perf_counter() - started
            if decided.delay_s is None or decided.delay_s > 0:
                await self._wait_for_arrivals(decided.delay_s, now_s)
                continue
            # 2. Take drafts (one per session, round robin across devices) that fit a step; the model thread
            #    owns session state.
            busy_from = time.perf_counter()
            self.steps += 1
            self.gate.disarm()
            self.arrived.clear()  # set again by any draft arriving during the step
            batch = self.queue.take(batch_size(self.policy, self.queue.scored_tokens()))
            prefill_before = self.stats.prefill_tokens
            outcomes = await self._run_step([queued.draft for queued in batch])
            # 3. Teach the cost model what this step cost.
            step_s = time.perf_counter() - busy_from
            verified = [o for o in outcomes if o.kind is OutcomeKind.VERIFIED]
            scored = sum(len(o.draft.tokens) + 1 for o in verified)
            tokens = scored + self.stats.prefill_tokens - prefill_before
            if tokens:
                self.cost.observe(len(verified), tokens, step_s)
            if verified and self.engine.verify_cost is not None:  # a step that verified drafts: what devices are priced on
                verify_s, rode_tokens = self.engine.verify_cost  # prefill chunks that rode in it count as scored tokens
                self.pricing.observe(len(verified), scored, rode_tokens, verify_s, self.stats.outside_model_s())
            # 4. Deferred drafts go back to the head of the queue with their arrival time; answer the others.
            taken = {queued.key: queued for queued in batch}
            self.queue.requeue([taken[o.device, o.draft.session_id] for o in outcomes
                                if o.kind is OutcomeKind.DEFERRED])
            await self._answer(client, outcomes, taken, now_s)
            self.stats.busy_s += time.perf_counter() - busy_from
            self.idle_since_s = time.monotonic()
            log.debug("batch_verified", drafts=len(batch), outcomes=len(outcomes), queued=len(self.queue),
                      devices=len({queued.draft.device_id for queued in batch}),
                      prefill_tokens=self.stats.prefill_tokens - prefill_before, step_ms=round(1000 * step_s, 2), predicted_ms=round(1000 * self.cost.predict(len(verified), tokens), 2))
            if not tokens and all(o.kind is OutcomeKind.DEFERRED for o in outcomes):
                await self._idle_until_arrival()

    async def _idle_until_arrival(self) -> None:
        """The step only deferred drafts and ran nothing (their devices over their share of time while others
        have work, or the prefill budget taken): stepping them again at once would spin on the same drafts, so
        wait for a new draft (whose step gives them their share), at most ``max_wait_s``."""
        if not self.arrived.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.policy.max_wait_s):
                    await self.arrived.wait()

    async def _wait_for_arrivals(self, delay: float | None, now_s: float) -> None:
        """Wait ``delay`` seconds (None: until a draft arrives), woken early by any arrival."""
        self.arrived.clear()
        try:
            async with asyncio.timeout(delay):
                await self.arrived.wait()
        except TimeoutError:  # learn how late the loop wakes us, and wake that much earlier
            lag_s = max(0.0, time.monotonic() - now_s - delay)
            self.wake_lag_s = 0.9 * self.wake_lag_s + 0.1 * min(lag_s, self.policy.max_wait_s / 2)

    async def _answer(self, client: Link, outcomes: list[Outcome], taken: dict[tuple[str, str], Queued],
                      stepped_s: float) -> None:
        """Publish each outcome's verdict; record queue delays (as of ``stepped_s``) and tell the arrival
        predictor which sessions will draft again."""
        sent_s, messages = time.monotonic(), []
        for outcome in outcomes:
            key = (outcome.device, outcome.draft.session_id)
            if outcome.kind is not OutcomeKind.DEFERRED:
                arrival_s = taken[key].arrival_s
                self.stats.record_queue_delay(stepped_s - arrival_s, stepped_s - max(arrival_s, self.idle_since_s))
            verdict = outcome.verdict
            if verdict is None:
                continue
            log.debug("draft_answered", device_id=outcome.device, session_id=verdict.session_id, seq=verdict.seq,
                      kind=str(verdict.kind), error=verdict.error and str(verdict.error),
                      steps_waited=self.steps - taken[key].arrival_step)
            if verdict.kind is VerdictKind.ERROR:
                self.stats.errors[str(verdict.error)] += 1
                self.arrivals.forget(key)
            elif verdict.kind is VerdictKind.VERIFIED and verdict.finish is None:
                self.arrivals.verdict_sent(key, sent_s)
            else:
                self.arrivals.forget(key)
            if (message := self._verdict_message(outcome.device, verdict)) is not None:
                messages.append(message)
        started = time.perf_counter()
        await client.publish_many(messages, qos=topics.QOS_VERDICT)  # one write for the step's verdicts
        self.stats.publish_s += time.perf_counter() - started

    def _active_devices(self) -> frozenset[str]:
        """Devices with work: a draft queued, or a round expected back (the verifier's time is shared among them)."""
        return self.queue.devices() | self.arrivals.waiting_rhythms()

    async def _run_step(self, drafts: list[Draft]) -> list[Outcome]:
        """``engine.step`` in the model thread. A failing batch is split in halves until the draft that
        fails on its own is found; only that one is refused (a failed step changes no committed state,
        so retrying the others is safe and they never notice)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.model_thread, self.engine.step, drafts, self._active_devices())
        except Exception as exc:
            if len(drafts) > 1:
                log.warning("batch_failed_retrying_halves", drafts=len(drafts), error=repr(exc))
                middle = len(drafts) // 2
                return await self._run_step(drafts[:middle]) + await self._run_step(drafts[middle:])
            log.exception("draft_failed", device_id=drafts[0].device_id, session_id=drafts[0].session_id)
            reason = f"verification failed: {exc.__class__.__name__}: {exc}"
            return await loop.run_in_executor(self.model_thread, self.engine.fail, drafts, reason)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            log.info("verifier_stats", sessions=self.engine.session_count, **self.stats.summary())

    async def _announce(self, client: Link) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            await client.publish(topics.status_topic(self.config.verifier_id), encode(self.status(True)),
                                 qos=topics.QOS_STATUS, retain=topics.RETAIN_STATUS)
