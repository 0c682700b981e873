"""The edge device: one broker connection, a draft model, many concurrent generations.

``EdgeDevice.generate`` is the edge's speculative decoding loop; the verifier directory
(``sled_edge.directory``) says which verifier a session opens on or moves to, the round trip
(``sled_edge.round_trip``) carries each round's draft to it and brings its verdict back, resending and moving
as needed. Each round (see docs/ARCHITECTURE.md, the route of one draft):
  1. draft k tokens with the ONNX model (in a worker thread, so MQTT keepalives never starve), unless they
     were drafted ahead during the last round (proactive drafting, ``sled_edge.drafter.Guess``);
  2. while the round trip carries the draft to the verifier and waits for its verdict, draft the next round
     in a worker thread as if every token will be accepted;
  3. commit the accepted tokens and the next token; keep the round drafted ahead if the verdict agrees
     with it, else drop it and roll the draft KV cache back; repeat.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from sled_edge.ahead import AheadPolicy
from sled_edge.config import EdgeConfig
from sled_edge.controller import DraftLengthController, StepPrice
from sled_edge.connection import BrokerUnavailable, EdgeConnection
from sled_edge.directory import VerifierDirectory
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import Drafter, Guess, Proposal
from sled_edge.errors import EdgeError
from sled_edge.round_trip import RoundObserver, RoundTrip
from sled_edge.session import EdgeSession
from sled_protocol import Draft, FinishReason, Limits, SamplingParams, Status, Verdict
from sled_protocol.config import ConfigError
from sled_protocol.transport import parse_broker_urls
from sled_protocol.vocab import vocab_hash

__all__ = ["EdgeDevice", "EdgeError", "GenerationResult", "RoundObserver"]

log = structlog.get_logger("sled_edge")


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]      # the committed new tokens (prompt excluded)
    text: str
    finish_reason: str | None
    seed: int | None
    rounds: int
    draft_tokens: int
    accepted_tokens: int
    mean_acceptance_length: float  # 1 + accepted / rounds (vLLM's name and definition)
    acceptance_rate: float
    resyncs: int
    retries: int
    failovers: int
    guesses: int              # proactive drafting: next rounds drafted while a round was verified
    guesses_held: int         # of which the verdict agreed, so the round went out at once
    spec_decode: dict         # the acceptance figures under vLLM's names (SessionStats.spec_decode)
    verifier: str
    target: str | None        # identity of the target that produced every token (None: not announced)
    session_id: str
    elapsed_s: float

    def as_dict(self) -> dict[str, object]:
        data = dict(self.__dict__)
        data.update(data.pop("spec_decode"))  # flat, beside our own names for the same counts
        data["mean_accepted_length"] = self.mean_acceptance_length  # the name before issue 23, kept for a release
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
        self.controller = DraftLengthController(k_max=config.k_max)  # per device, all sessions
        self.ahead = ahead or AheadPolicy()  # whether proactive drafting pays on this device (all sessions)
        self.connection = EdgeConnection(parse_broker_urls(config.mqtt_url), config.device_id, config.ca_file or None,
                                         config.mqtt_protocol)
        self.directory = VerifierDirectory(self.connection, self.vocab, config.verifier, config.discovery_timeout_s)

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

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``token_ids``; the API leaves special tokens (an EOS) out unless a request keeps them."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    async def choose_verifier(self) -> Status:
        """The verifier a new session would open on now (``VerifierDirectory.choose``)."""
        return await self.directory.choose()

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                       on_tokens: Callable[[list[int]], bool | None] | None = None,
                       sampling: SamplingParams | None = None,
                       verifier_wait_s: float | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``, exactly as the target would:
        its greedy output when ``sampling`` is None (or greedy), else a sample from its distribution (the
        same seed gives the same output). ``on_tokens`` sees each round's newly committed tokens; returning
        True stops the generation there (finish reason "stop"). With no verifier online the session waits
        ``verifier_wait_s`` for one (default ``discovery_timeout_s``), then fails with no_verifier."""
        started = time.perf_counter()
        session, verifier = await self._open(prompt_ids, max_new_tokens, sampling, verifier_wait_s)
        drafter = Drafter(self.model)
        # A sampled session's realisation depends on where drafts start and stop, so a seed reproduces it
        # only if k does not depend on timing: it gets its own controller that learns from acceptance alone.
        seeded = sampling is not None and not sampling.greedy
        controller = DraftLengthController(k_max=self.config.k_max) if seeded else self.controller
        guess: Guess | None = None  # the next round, drafted while this one is verified (proactive drafting)
        async with RoundTrip(self.connection, self.directory, self.config, session, verifier, self.observer) as trip:
            try:
                while session.finish is None:
                    limit = max(0, min(self._max_draft_tokens(trip.holder_status), session.budget - 1))
                    price = self._price(trip.holder_status, seeded)
                    k = min(self.config.draft_tokens, limit) if self.config.draft_tokens else controller.choose(limit, price)
                    # 1. This round's draft: the one drafted ahead if the verdict agreed with it, else drafted now.
                    proposal = await self._this_round(drafter, session, guess, k, limit, seeded)
                    # 2. While the round trip carries it to the verifier, draft the next round as if all is accepted.
                    guess, drafting_ahead = self._draft_ahead(drafter, session, proposal, controller, trip.holder_status)
                    verifying = time.perf_counter()
                    draft, verdict = await trip.exchange(proposal)
                    self._observe(controller, draft, verdict, proposal, seeded, time.perf_counter() - verifying)
                    new_tokens = session.apply(draft, verdict)
                    # 3. Keep the guess if the verdict agrees with it, else drop it and roll the cache back.
                    held = await self._settle(guess, drafting_ahead, drafter, session, verdict)
                    if guess is not None:
                        self.ahead.observe_guess(held)
                    if not held:
                        guess = None
                        drafter.rollback(verdict.committed_len, draft.base_len, verdict.accepted, len(draft.tokens))
                    trip.log.debug("round_verified", seq=draft.seq, k=len(draft.tokens), accepted=verdict.accepted,
                                   next_kind=str(verdict.next_kind), guessed=guess is not None)
                    if on_tokens is not None and on_tokens(new_tokens):
                        session.finish = FinishReason.STOP
            finally:
                if guess is not None:  # an error or a cancel mid-round: the thread stops at its next step
                    guess.abandoned = True
        return self._result(session, len(prompt_ids), trip.holder_status, seeded, time.perf_counter() - started)

    @staticmethod
    def _max_draft_tokens(verifier: Status) -> int:
        """The longest draft ``verifier`` takes: what it announced, else what a verifier takes by default."""
        return verifier.max_draft_tokens or Limits.max_draft_tokens

    async def _open(self, prompt_ids: Sequence[int], max_new_tokens: int,
                    sampling: SamplingParams | None, wait_s: float | None = None) -> tuple[EdgeSession, Status]:
        """A new session on the verifier chosen for it, pinned to that verifier's target from now on; its length
        capped at the verifier's context limit (EdgeError when the prompt alone fills it)."""
        verifier = await self.directory.choose(timeout_s=wait_s)
        max_len = len(prompt_ids) + max_new_tokens
        if verifier.max_context_tokens and max_len > verifier.max_context_tokens:
            if len(prompt_ids) >= verifier.max_context_tokens:
                raise EdgeError("too_large", f"prompt of {len(prompt_ids)} tokens fills verifier "
                                f"{verifier.verifier_id}'s context limit of {verifier.max_context_tokens}")
            log.warning("max_new_tokens_capped", verifier=verifier.verifier_id,
                        max_context_tokens=verifier.max_context_tokens)
            max_len = verifier.max_context_tokens
        session = EdgeSession(uuid.uuid4().hex[:12], self.config.device_id, self.vocab, list(prompt_ids),
                              max_len, sampling=sampling, target=verifier.target)
        return session, verifier

    async def _this_round(self, drafter: Drafter, session: EdgeSession, guess: Guess | None, k: int, limit: int,
                          seeded: bool) -> Proposal:
        """The guess drafted during the last round when the verdict agreed with it (and, for a seeded session,
        it has the k this round would have: the output follows from the seed), else a draft made now."""
        if guess is not None and guess.agrees(session.committed) and (guess.k == k or not seeded) \
                and len(guess.proposal.tokens) <= limit:
            session.stats.guesses_held += 1
            return guess.proposal
        if guess is not None:  # agreed, but not usable here: back to the committed prefix
            drafter.cache.truncate(len(session.committed) - 1)
        return await asyncio.to_thread(drafter.propose, session.committed, k, session.sampling,
                                       self.config.proposal_tokens)

    def _price(self, verifier: Status, seeded: bool) -> StepPrice | None:
        """The verifier's announced step cost, when k is priced: never for a seeded sample, whose k sequence (and
        so its realisation) must follow from the seed alone, not from the server's load."""
        return None if seeded or not self.config.priced else StepPrice.from_wire(verifier.step_cost)

    def _observe(self, controller: DraftLengthController, draft: Draft, verdict: Verdict, proposal: Proposal,
                 seeded: bool, round_s: float) -> None:
        """Feed the round's acceptance and timings to the draft-length controller and the proactive policy."""
        if seeded or draft.context is not None:
            # Acceptance only: for a seeded session the k sequence (and so the output) must follow from
            # the seed; a round that carried context also timed both sides' prefill, not a round.
            controller.observe(len(draft.tokens), verdict.accepted, len(draft.tokens) * controller.draft_s,
                               controller.round_s)
        else:
            controller.observe(len(draft.tokens), verdict.accepted, proposal.draft_s, round_s)
        if draft.context is None:
            self.ahead.observe_round(len(draft.tokens), proposal.draft_s, round_s)

    def _result(self, session: EdgeSession, prompt_len: int, verifier: Status, seeded: bool,
                elapsed_s: float) -> GenerationResult:
        new_ids = session.committed[prompt_len:]
        stats = session.stats
        log.info("generation_finished", device_id=session.device_id, session_id=session.session_id, tokens=len(new_ids),
                 rounds=stats.rounds, mean_acceptance_length=round(stats.mean_acceptance_length, 3),
                 guesses_held=stats.guesses_held)
        return GenerationResult(
            token_ids=new_ids, text=self.decode(new_ids), finish_reason=str(session.finish),
            seed=session.sampling.seed if seeded else None,
            rounds=stats.rounds, draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
            mean_acceptance_length=round(stats.mean_acceptance_length, 4),
            acceptance_rate=round(stats.acceptance_rate, 4),
            resyncs=stats.resyncs, retries=stats.retries, failovers=stats.failovers,
            guesses=stats.guesses, guesses_held=stats.guesses_held, spec_decode=stats.spec_decode(),
            verifier=verifier.verifier_id, target=session.target, session_id=session.session_id,
            elapsed_s=round(elapsed_s, 4),
        )

    def _draft_ahead(self, drafter: Drafter, session: EdgeSession, proposal: Proposal,
                     controller: DraftLengthController, verifier: Status) -> tuple[Guess | None, asyncio.Future | None]:
        """Start drafting the round after ``proposal`` in a worker thread, assuming the verifier accepts all of
        it; the guessed round gets the k this loop would choose after such a verdict. None when proactive
        drafting is off or does not pay here (``AheadPolicy``), or such a verdict would end the generation (an
        EOS drafted, no room left)."""
        tokens = proposal.tokens
        room = min(self._max_draft_tokens(verifier), session.budget - len(tokens) - 1 - 1)
        if not self.config.proactive or not tokens or tokens[-1] in self.model.eos_ids or room < 1:
            return None, None
        if self.config.draft_tokens:
            k_next = min(self.config.draft_tokens, room)
        else:  # what the controller will choose after observing an all-accepted round (as a seeded one does)
            after = copy.deepcopy(controller)
            after.observe(len(tokens), len(tokens), len(tokens) * after.draft_s, after.round_s)
            k_next = after.choose(room, self._price(verifier, seeded=session.sampling is not None
                                                    and not session.sampling.greedy))
        if k_next < 1 or not self.ahead.pays(k_next):
            return None, None
        guess = Guess.after(session.committed, tokens, k_next)
        session.stats.guesses += 1
        thread = asyncio.ensure_future(asyncio.to_thread(drafter.draft_ahead, guess, session.sampling,
                                                          self.config.proposal_tokens))
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
