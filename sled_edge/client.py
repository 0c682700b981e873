"""The edge's asyncio/MQTT shell: one broker connection per device, many concurrent sessions.

Each round (see ARCHITECTURE.md, message flow):
  1. draft k tokens with the ONNX model (in a worker thread, so MQTT keepalives never starve);
  2. publish the Draft and wait for its Verdict (by session and seq), resending on timeout;
  3. on resync resend with the full committed context; on error stop with the verifier's reason;
  4. commit the accepted tokens and the next token, roll the draft KV cache back, repeat.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

import aiomqtt
import structlog

from sled_edge.config import EdgeConfig
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import Drafter, Proposal
from sled_edge.session import EdgeSession
from sled_protocol import Draft, FinishReason, ProtocolError, SamplingParams, Status, Verdict, VerdictKind, decode_status, decode_verdict, encode
from sled_protocol import topics
from sled_protocol.mqtt import make_client, parse_mqtt_url
from sled_protocol.vocab import vocab_hash

log = structlog.get_logger("sled_edge")

MAX_RESYNCS_PER_ROUND = 3
_LOST = object()  # put in every session's queue when the broker connection is lost


class RoundObserver(Protocol):
    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None: ...


class EdgeError(RuntimeError):
    """A generation that cannot go on; ``code`` is the verifier's error code or one of ours."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


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
    verifier: str
    session_id: str
    elapsed_s: float

    def as_dict(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data["tokens_per_s"] = round(len(self.token_ids) / self.elapsed_s, 2) if self.elapsed_s else 0.0
        return data


class EdgeDevice:
    """``async with EdgeDevice(config) as device: await device.generate(...)``."""

    def __init__(self, config: EdgeConfig, model: OnnxDraftModel | None = None,
                 observer: RoundObserver | None = None) -> None:
        from tokenizers import Tokenizer

        self.config = config
        self.observer = observer
        self.model = model or OnnxDraftModel(config.draft, config.threads)
        self.vocab = vocab_hash(config.draft)
        self.tokenizer = Tokenizer.from_file(f"{config.draft}/tokenizer.json")
        self.verifiers: dict[str, Status] = {}
        self._status_changed = asyncio.Event()
        self._waiters: dict[str, asyncio.Queue[Verdict]] = {}
        self._stack = AsyncExitStack()
        self._client: aiomqtt.Client | None = None
        self._lost: BaseException | None = None

    async def __aenter__(self) -> EdgeDevice:
        address = parse_mqtt_url(self.config.mqtt_url)
        identifier = f"sled-edge-{self.config.device_id}-{uuid.uuid4().hex[:8]}"
        self._client = await self._stack.enter_async_context(make_client(address, identifier))
        await self._client.subscribe(topics.verdict_topic(self.config.device_id), qos=topics.QOS_VERDICT)
        await self._client.subscribe(topics.STATUS_FILTER, qos=topics.QOS_STATUS)
        dispatcher = asyncio.create_task(self._dispatch(), name="dispatch")
        dispatcher.add_done_callback(self._dispatcher_done)
        self._dispatcher = dispatcher

        async def stop_dispatcher() -> None:
            dispatcher.cancel()
            await asyncio.wait([dispatcher])

        self._stack.push_async_callback(stop_dispatcher)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._stack.aclose()

    def _dispatcher_done(self, task: asyncio.Task) -> None:
        """The broker connection is gone: wake every waiting session so it fails now, not after its timeouts."""
        if task.cancelled():
            return
        self._lost = task.exception() or EdgeError("broker_lost", "the broker closed the connection")
        log.error("broker_connection_lost", error=str(self._lost))
        for queue in self._waiters.values():
            queue.put_nowait(_LOST)

    async def wait_closed(self) -> None:
        """Return never while connected; raise EdgeError("broker_lost") when the connection ends."""
        await asyncio.wait([self._dispatcher])
        raise EdgeError("broker_lost", f"lost the broker connection: {self._lost}")

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    async def _dispatch(self) -> None:
        verdict_topic = topics.verdict_topic(self.config.device_id)
        async for message in self._client.messages:
            topic, payload = str(message.topic), bytes(message.payload)
            try:
                if topic == verdict_topic:
                    self._route(decode_verdict(payload))
                elif message.topic.matches(topics.STATUS_FILTER):
                    status = decode_status(payload)
                    self.verifiers[status.verifier] = status
                    self._status_changed.set()
            except ProtocolError as exc:
                log.warning("message_undecodable", topic=topic, error=str(exc))

    def _route(self, verdict: Verdict) -> None:
        queue = self._waiters.get(verdict.session) if verdict.session else None
        if queue is not None:
            queue.put_nowait(verdict)
        elif verdict.kind is VerdictKind.ERROR:
            log.warning("verifier_refused_message", error=str(verdict.error), reason=verdict.reason)
        else:
            log.debug("verdict_unclaimed", session_id=verdict.session, seq=verdict.seq)

    async def choose_verifier(self) -> Status:
        """The least loaded online verifier whose vocabulary is ours (or the configured one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.discovery_timeout_s
        while True:
            online = [s for s in self.verifiers.values()
                      if s.online and (not self.config.verifier or s.verifier == self.config.verifier)]
            matching = [s for s in online if s.vocab == self.vocab]
            if matching:
                return min(matching, key=lambda s: (s.load / max(s.capacity, 1), s.verifier))
            if loop.time() >= deadline:
                seen = [s for s in self.verifiers.values() if s.online]
                others = ", ".join(f"{s.verifier} (vocab {s.vocab})" for s in seen) or "none online"
                wanted = f"verifier {self.config.verifier!r}" if self.config.verifier else "a verifier"
                raise EdgeError("no_verifier", f"found no {wanted} with vocabulary {self.vocab} within "
                                f"{self.config.discovery_timeout_s} s; seen: {others}")
            self._status_changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._status_changed.wait()
            except TimeoutError:
                pass

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
                              max_len, sampling=sampling)
        slog = log.bind(device_id=session.device, session_id=session.session_id, verifier=verifier.verifier)
        drafter = Drafter(self.model)
        queue: asyncio.Queue[Verdict] = asyncio.Queue()
        self._waiters[session.session_id] = queue
        k_limit = verifier.max_draft_tokens or self.config.draft_tokens
        try:
            while session.finish is None:
                k = max(0, min(self.config.draft_tokens, k_limit, session.budget - 1))
                proposal = await asyncio.to_thread(drafter.propose_sampled, session.committed, k, sampling,
                                                   self.config.proposal_tokens)
                draft, verdict = await self._verify_round(session, proposal, queue, verifier.verifier, slog)
                new_tokens = session.apply(draft, verdict)
                drafter.learn(verdict.committed_len, draft.base_len, verdict.accepted)
                slog.debug("round_verified", seq=draft.seq, k=len(draft.tokens), accepted=verdict.accepted,
                           next_kind=str(verdict.next_kind))
                if on_tokens is not None and on_tokens(new_tokens):
                    session.finish = FinishReason.STOP
        finally:
            del self._waiters[session.session_id]
        new_ids = session.committed[len(prompt_ids):]
        stats = session.stats
        slog.info("generation_finished", tokens=len(new_ids), rounds=stats.rounds,
                  mean_accepted_length=round(stats.mean_accepted_length, 3))
        return GenerationResult(
            token_ids=new_ids, text=self.decode(new_ids), finish_reason=str(session.finish),
            seed=sampling.seed if sampling is not None and sampling.temperature > 0 else None,
            rounds=stats.rounds, draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
            mean_accepted_length=round(stats.mean_accepted_length, 4), acceptance_rate=round(stats.acceptance_rate, 4),
            resyncs=stats.resyncs, retries=stats.retries, verifier=verifier.verifier,
            session_id=session.session_id, elapsed_s=round(time.perf_counter() - started, 4),
        )

    async def _verify_round(self, session: EdgeSession, proposal: Proposal, queue: asyncio.Queue[Verdict],
                            verifier: str, slog) -> tuple[Draft, Verdict]:
        topic = topics.draft_topic(verifier, session.device)
        draft = session.draft(proposal.tokens, proposal.sparse)
        resends = resyncs = 0
        while True:
            sent_s = time.perf_counter()
            try:
                await self._client.publish(topic, encode(draft), qos=topics.QOS_DRAFT)
            except aiomqtt.MqttError as exc:
                raise EdgeError("broker_lost", f"cannot publish to the broker: {exc}") from None
            try:
                verdict = await self._await_verdict(queue, draft.seq)
            except TimeoutError:
                resends += 1
                session.stats.retries += 1
                if resends > self.config.retries:
                    raise EdgeError("verifier_timeout", f"no verdict from {verifier} for round {draft.seq} after "
                                    f"{resends} tries of {self.config.timeout_s} s") from None
                slog.warning("verdict_timeout", seq=draft.seq, resend=resends)
                continue
            if verdict.kind is VerdictKind.VERIFIED:
                if self.observer is not None:
                    committed = verdict.accepted + (verdict.next_token is not None)
                    self.observer.round_done(len(draft.tokens), verdict.accepted, committed, time.perf_counter() - sent_s)
                return draft, verdict
            if verdict.kind is VerdictKind.ERROR:
                raise EdgeError(str(verdict.error), verdict.reason or "refused by the verifier")
            resyncs += 1
            session.stats.resyncs += 1
            if resyncs > MAX_RESYNCS_PER_ROUND:
                raise EdgeError("resync_loop", f"verifier {verifier} asked for resync {resyncs} times in one round")
            slog.info("session_resync", seq=draft.seq, reason=verdict.reason)
            session.send_context = True
            draft = session.draft(proposal.tokens, proposal.sparse)

    async def _await_verdict(self, queue: asyncio.Queue[Verdict], seq: int) -> Verdict:
        async with asyncio.timeout(self.config.timeout_s):
            while True:
                if self._lost is not None:
                    raise EdgeError("broker_lost", f"lost the broker connection: {self._lost}")
                verdict = await queue.get()
                if verdict is _LOST:
                    continue
                if verdict.seq == seq:
                    return verdict  # anything else is a duplicate or a stale round's answer
