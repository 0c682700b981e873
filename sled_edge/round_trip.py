"""One session's traffic with the verifier holding it: publish a round's draft until that round's verdict
arrives, and say goodbye when the session ends early.

The round trip owns the session's place in the connection (its verdict queue, and which verifier's verdicts
may reach it). Per round (``exchange``):
  1. wait for the broker (an outage is not the verifier's silence: nothing is counted, nobody moves);
  2. publish the draft to the current verifier and wait ``timeout_s`` for its verdict for this seq;
  3. silence: resend, and after ``FAILOVER_AFTER_TIMEOUTS`` unanswered sends (or at once when the verifier
     published offline) move to another verifier of the session's target (``sled_edge.directory``); a move
     resends with the full committed context, which the new verifier prefills;
  4. "retry later" (overloaded, rate limited): back off with jitter, and move after every
     ``FAILOVER_AFTER_REFUSALS`` refusals; give up after ``outage_timeout_s``;
  5. resync (or the verifier's own internal error, after which it forgot the session): resend with context;
     any other refusal ends the generation with the verifier's reason.
The draft is rebuilt from the session for every send, so a move or a resync only has to set
``session.send_context``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from sled_edge.config import EdgeConfig
from sled_edge.connection import RECONNECTED, EdgeConnection, VerifierDown
from sled_edge.directory import VerifierDirectory
from sled_edge.drafter import Proposal
from sled_edge.errors import EdgeError
from sled_edge.session import EdgeSession
from sled_protocol import Close, Draft, ErrorCode, FinishReason, Status, Verdict, VerdictKind, encode
from sled_protocol import topics
from sled_protocol.connection import backoff_s

__all__ = ["RoundObserver", "RoundTrip"]

log = structlog.get_logger("sled_edge")

MAX_RESYNCS_PER_ROUND = 3
FAILOVER_AFTER_TIMEOUTS = 2  # silent verifier: after this many unanswered sends, try another one
FAILOVER_AFTER_REFUSALS = 2  # busy verifier: after every this many "retry later" refusals, try another one
BUSY = (ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED)  # refusals that mean "not now", not "never"


class RoundObserver(Protocol):
    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None: ...


@dataclass
class _Tries:
    """One round's count of what went wrong so far."""

    resends: int = 0                  # unanswered sends to the current verifier
    resyncs: int = 0
    refusals: int = 0                 # "retry later" answers
    busy_since: float | None = None   # when the verifiers began answering "retry later" to this round
    stranded: EdgeError | None = None  # the last move refused because no one else serves the session's target


class RoundTrip:
    """``async with RoundTrip(...) as trip: draft, verdict = await trip.exchange(proposal)``; on leaving, a
    session the verifier still holds (it ended by a stop, a cancel or an error) is closed there."""

    def __init__(self, connection: EdgeConnection, directory: VerifierDirectory, config: EdgeConfig,
                 session: EdgeSession, holder_status: Status, observer: RoundObserver | None = None) -> None:
        self.connection, self.directory, self.config = connection, directory, config
        self.session = session
        self.holder_status = holder_status  # the Status of the verifier holding the session now
        self.observer = observer
        self.log = log.bind(device_id=session.device_id, session_id=session.session_id)
        self._verdicts: asyncio.Queue | None = None

    @property
    def holder(self) -> str:
        """The id of the verifier holding the session now."""
        return self.holder_status.verifier_id

    async def __aenter__(self) -> RoundTrip:
        self._verdicts = self.connection.expect(self.session.session_id, self.holder)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.connection.forget(self.session.session_id)
        if self.session.finish not in (FinishReason.EOS, FinishReason.LENGTH):
            await self._close()

    async def exchange(self, proposal: Proposal) -> tuple[Draft, Verdict]:
        """This round's draft as sent last, and its VERIFIED verdict (module docstring, steps 1-5)."""
        tries = _Tries()
        while True:
            draft = self.session.draft(proposal.tokens, proposal.sparse)
            await self._connected()
            if await self._left_a_changed_target():
                tries.resends = 0
                continue
            sent_s = time.perf_counter()
            try:
                topic = topics.draft_topic(self.holder, self.session.device_id)
                await self.connection.publish(topic, encode(draft), self.config.timeout_s)
            except TimeoutError:
                continue  # the connection dropped while publishing: wait for it above
            verdict = await self._verdict_for(draft.seq)
            if verdict is None or isinstance(verdict, VerifierDown):
                await self._unanswered(draft, verdict is not None, tries)
            elif verdict is RECONNECTED:
                continue  # the broker came back: the draft or its verdict may be lost, resend now
            elif verdict.kind is VerdictKind.VERIFIED and not self._computed_by_our_target(verdict):
                await self._leave_a_foreign_target(verdict)
            elif verdict.kind is VerdictKind.VERIFIED:
                if self.observer is not None:
                    committed = verdict.accepted + (verdict.next_token is not None)
                    self.observer.round_done(len(draft.tokens), verdict.accepted, committed,
                                             time.perf_counter() - sent_s)
                return draft, verdict
            elif verdict.kind is VerdictKind.ERROR and verdict.error in BUSY:
                await self._busy(draft, verdict, tries)
            elif verdict.kind is VerdictKind.ERROR and verdict.error is not ErrorCode.INTERNAL:
                raise EdgeError(str(verdict.error), verdict.reason or "refused by the verifier")
            else:
                self._resync(draft, verdict, tries)

    async def _connected(self) -> None:
        """Wait for the broker (bounded by ``outage_timeout_s``); the round is resent once it is back."""
        try:
            async with asyncio.timeout(self.config.outage_timeout_s):
                await self.connection.connected.wait()
        except TimeoutError:
            outage_s = self.config.outage_timeout_s
            raise EdgeError("broker_unreachable", f"no broker connection for {outage_s} s") from None

    async def _left_a_changed_target(self) -> bool:
        """Whether the session had to move because its verifier's id now serves another target (restarted with a
        new model: never send the session there); EdgeError when no verifier of its target is left."""
        announced = self.directory.get(self.holder)
        if announced is None or not announced.online or announced.target == self.session.target:
            return False
        refusal = await self._move()
        if refusal is not None:
            raise EdgeError("target_unavailable", f"verifier {self.holder} now serves target "
                            f"{announced.target}, not the session's {self.session.target}; {refusal.detail}")
        return True

    def _computed_by_our_target(self, verdict: Verdict) -> bool:
        """A verdict naming a target computed it there: it must be the one the session is pinned to (a verifier
        restarted with another model under the same id answers before its new Status arrives). None: a verifier
        that names no target, which only the announced Status can be checked for."""
        return verdict.target is None or verdict.target == self.session.target

    async def _leave_a_foreign_target(self, verdict: Verdict) -> None:
        """Never apply tokens another target chose: move to a verifier of ours (resending with context), or fail."""
        self.log.warning("verdict_target_mismatch", seq=verdict.seq, verifier=verdict.verifier_id,
                         target=verdict.target, pinned=self.session.target)
        refusal = await self._move()
        if refusal is not None:
            raise EdgeError("target_unavailable", f"verifier {verdict.verifier_id} answered with target "
                            f"{verdict.target}, not the session's {self.session.target}; {refusal.detail}")

    async def _unanswered(self, draft: Draft, verifier_down: bool, tries: _Tries) -> None:
        """No verdict in ``timeout_s`` (or the verifier went offline): count it, give up or move."""
        if not verifier_down:
            tries.resends += 1
            self.session.stats.retries += 1
            if tries.resends > self.config.retries:
                silent = (f"no verdict from {self.holder} for round {draft.seq} after {tries.resends} "
                          f"tries of {self.config.timeout_s} s")
                if tries.stranded is not None:  # others were online, but none serves the session's target
                    raise EdgeError(tries.stranded.code, f"{silent}; {tries.stranded.detail}")
                raise EdgeError("verifier_timeout", silent)
            self.log.warning("verdict_timeout", seq=draft.seq, resend=tries.resends, verifier=self.holder)
        if verifier_down or tries.resends >= FAILOVER_AFTER_TIMEOUTS:
            refusal = await self._move()
            tries.stranded = refusal if refusal is not None and refusal.code == "target_unavailable" else None
            if refusal is None:
                tries.resends = 0  # the new verifier gets its own tries

    async def _busy(self, draft: Draft, verdict: Verdict, tries: _Tries) -> None:
        """"Not now": back off before the resend, or move (and resend at once); give up after the outage budget."""
        tries.busy_since = tries.busy_since if tries.busy_since is not None else time.monotonic()
        if time.monotonic() - tries.busy_since > self.config.outage_timeout_s:
            raise EdgeError(str(verdict.error), f"verifier {self.holder} still refuses round {draft.seq} "
                            f"after {self.config.outage_timeout_s} s: {verdict.reason}")
        tries.refusals += 1
        self.log.info("verifier_busy", seq=draft.seq, error=str(verdict.error), verifier=self.holder,
                      refusals=tries.refusals)
        if tries.refusals % FAILOVER_AFTER_REFUSALS == 0 and await self._move() is None:
            tries.resends = 0
            return  # a fresh verifier: try it now (the backoff keeps growing if it is busy too)
        # Jittered, so devices refused together do not come back together.
        await asyncio.sleep(backoff_s(tries.refusals - 1, base_s=0.05, cap_s=2.0) * random.uniform(0.5, 1.0))

    def _resync(self, draft: Draft, verdict: Verdict, tries: _Tries) -> None:
        """RESYNC, or INTERNAL (the verifier failed on this round and forgot the session): resend with context."""
        tries.resyncs += 1
        self.session.stats.resyncs += 1
        if tries.resyncs > MAX_RESYNCS_PER_ROUND:
            raise EdgeError("resync_loop", f"verifier {self.holder} asked for resync {tries.resyncs} "
                            "times in one round")
        self.log.info("session_resync", seq=draft.seq, reason=verdict.reason, verifier=self.holder)
        self.session.send_context = True

    async def _move(self) -> EdgeError | None:
        """Move the session to another verifier serving its target, with its full committed history (the new
        one prefills it); None when it moved, else the refusal saying why it stays (``VerifierDirectory.move``)."""
        chosen, refusal = await self.directory.move(self.session, self.holder_status)
        if refusal is not None:
            self.log.warning("session_not_moved", seq=self.session.seq, verifier=self.holder,
                             reason=refusal.detail)
            return refusal
        self.session.stats.failovers += 1
        self.session.send_context = True
        self.connection.reassign(self.session.session_id, chosen.verifier_id)
        self.log.warning("session_failover", seq=self.session.seq, old=self.holder, new=chosen.verifier_id,
                         target=self.session.target)
        self.holder_status = chosen
        return None

    async def _verdict_for(self, seq: int) -> Verdict | object | None:
        """The holder's verdict for round ``seq``, or a connection sentinel; None after ``timeout_s``. Only the
        holder's verdicts and notices reach the queue (``EdgeConnection`` filters them, and a move empties it)."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                while True:
                    item = await self._verdicts.get()
                    if isinstance(item, VerifierDown) or item is RECONNECTED or item.seq == seq:
                        return item  # anything else is a duplicate or a stale round's answer
        except TimeoutError:
            return None

    async def _close(self) -> None:
        """Best effort: tell the verifier a session it still holds has ended (stop, cancel or error)."""
        message = encode(Close(device_id=self.session.device_id, session_id=self.session.session_id))
        try:
            await self.connection.publish(topics.draft_topic(self.holder, self.session.device_id), message,
                                          timeout_s=1.0)
        except TimeoutError:  # the broker is away; the verifier's LRU reclaims the session later
            log.debug("close_not_sent", session_id=self.session.session_id)
