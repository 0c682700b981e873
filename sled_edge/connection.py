"""The device's broker connection: connect, subscribe, dispatch, and reconnect with backoff forever (to the
next of the configured brokers, when they are a cluster's nodes), through the shared loop of
``sled_protocol.connection`` on whatever transport the URL names (MQTT, or ``memory://`` in tests).

The connection task is its own supervisor: a lost broker and an unexpected error alike (logged with its
traceback) clear ``connected`` and restart it after a backoff, so a waiting session either sees the
connection come back or runs out its outage budget; it never retries against a dead task. A message
that fails to dispatch is logged and dropped, never the connection.

Verdicts go to the waiting session's queue (by session id) when they come from the verifier holding that
session (its holder, ``holders``; a former holder's late answers are dropped, and a move empties the
session's queue of what its former holder left there); verifier statuses update ``statuses`` and set
``status_changed``. A session's round trip (``sled_edge.round_trip``) registers its
queue with ``expect``, follows its moves with ``reassign`` and leaves with ``forget``.
Sessions learn of events that need a resend now rather than after a timeout through sentinels put
in their queues: RECONNECTED (the broker came back; in-flight rounds may be lost) and ``VerifierDown``
(the verifier serving that session published offline, e.g. its last will after a crash; it names that
verifier, so a session that has meanwhile moved elsewhere ignores it).
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from sled_protocol import ProtocolError, Status, Verdict, VerdictKind, decode_status, decode_verdict
from sled_protocol import topics
from sled_protocol.connection import Reconnecting
from sled_protocol.transport import BrokerAddress, Link, TransportError, describe_brokers, topic_matches, transport_for

log = structlog.get_logger("sled_edge")

RECONNECTED = object()


class VerifierDown:
    """Queued for a session when ``verifier_id``, which held it, published offline."""

    __slots__ = ("verifier_id",)

    def __init__(self, verifier_id: str) -> None:
        self.verifier_id = verifier_id


class BrokerUnavailable(ConnectionError):
    """The first connection to the broker failed (later losses are retried)."""


class EdgeConnection:
    def __init__(self, addresses: list[BrokerAddress], device_id: str, ca_file: str | None = None,
                 protocol: str = "5") -> None:
        self.addresses = addresses
        self.device_id = device_id
        self.ca_file = ca_file
        self.protocol = protocol
        self.statuses: dict[str, Status] = {}
        self.status_changed = asyncio.Event()
        self.waiters: dict[str, asyncio.Queue] = {}
        self.holders: dict[str, str] = {}  # session id -> the id of the verifier holding it
        # The shared reconnect loop; ``Exception`` in restart_on: this task supervises itself.
        self.reconnecting = Reconnecting(
            [transport_for(address, ca_file=ca_file, protocol=protocol) for address in addresses],
            lambda: f"sled-edge-{device_id}-{uuid.uuid4().hex[:8]}",
            subscriptions=[(topics.verdict_topic(device_id), topics.QOS_VERDICT),
                           (topics.STATUS_FILTER, topics.QOS_STATUS)],
            restart_on=(Exception,), log=log)
        self.connected = self.reconnecting.connected
        self._task: asyncio.Task | None = None

    @property
    def reconnects(self) -> int:
        return self.reconnecting.reconnects

    @property
    def last_error(self) -> BaseException | None:
        """Why the latest attempt failed, for the start-up error."""
        return self.reconnecting.last_error

    def expect(self, session_id: str, verifier_id: str) -> asyncio.Queue:
        """The queue that ``session_id``'s verdicts from ``verifier_id`` (and the sentinels) will arrive in."""
        self.waiters[session_id] = asyncio.Queue()
        self.holders[session_id] = verifier_id
        return self.waiters[session_id]

    def reassign(self, session_id: str, verifier_id: str) -> None:
        """The session has moved: from now on only ``verifier_id``'s verdicts reach it, and what its former
        holder left queued (a late verdict, its offline notice, a reconnect) is dropped: the move resends anyway."""
        self.holders[session_id] = verifier_id
        queue = self.waiters[session_id]
        while not queue.empty():
            queue.get_nowait()

    def forget(self, session_id: str) -> None:
        del self.waiters[session_id], self.holders[session_id]

    async def start(self, timeout_s: float) -> None:
        self._task = asyncio.create_task(self.reconnecting.run(self._serve), name="mqtt-connection")
        try:
            async with asyncio.timeout(timeout_s):
                await self.connected.wait()
        except TimeoutError:
            await self.stop()
            cause = f": {self.last_error.__class__.__name__}: {self.last_error}" if self.last_error else ""
            message = f"cannot connect to the broker at {describe_brokers(self.addresses)} within {timeout_s} s{cause}"
            if self.protocol == "5":  # an MQTT 3.1.1-only broker drops a v5 CONNECT without an answer
                message += " (a broker that speaks only MQTT 3.1.1, such as RabbitMQ 3.10, needs mqtt_protocol 3.1.1)"
            raise BrokerUnavailable(message) from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def wait_stopped(self) -> None:
        """Until the connection task ends: only by ``stop`` (or a bug in the supervisor, raised here)."""
        await asyncio.wait([self._task])
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()

    async def _serve(self, link: Link) -> None:
        """One live connection: tell waiting sessions about a reconnect, then dispatch every message."""
        if self.reconnecting.connections > 1:
            self._wake_all(RECONNECTED)  # in-flight rounds may be lost: resend now, not after a timeout
        async for message in link.messages():
            self._dispatch(message.topic, message.payload, message.retain)

    async def publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """Publish once connected; TimeoutError when the broker stays away (the caller resends later)."""
        async with asyncio.timeout(timeout_s):
            while True:
                await self.connected.wait()
                link = self.reconnecting.link
                if link is None:  # woken by a connection that is already gone again
                    continue
                try:
                    await link.publish(topic, payload, qos=topics.QOS_DRAFT)
                    return
                except TransportError:
                    await asyncio.sleep(0.05)  # the connection task owns `connected` and reconnects

    def _dispatch(self, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            if topic == topics.verdict_topic(self.device_id):
                if retain:  # verdicts are never retained: one that is was planted, or is stale
                    log.warning("verdict_retained_ignored", topic=topic)
                    return
                self._route(decode_verdict(payload))
            elif topic_matches(topic, topics.STATUS_FILTER):
                status = decode_status(payload)
                if not _speaks_for_itself(topic, status):
                    log.warning("status_topic_mismatch", topic=topic, verifier=status.verifier_id[:80])
                    return
                was_online = self.statuses.get(status.verifier_id, status).online
                self.statuses[status.verifier_id] = status
                self.status_changed.set()
                if was_online and not status.online:
                    log.warning("verifier_offline", verifier=status.verifier_id)
                    for session_id, holder in list(self.holders.items()):
                        if holder == status.verifier_id and session_id in self.waiters:
                            self.waiters[session_id].put_nowait(VerifierDown(status.verifier_id))
        except ProtocolError as exc:
            log.warning("message_undecodable", topic=topic, error=str(exc))
        except Exception:  # a bug handling one message must not take the connection (and every session) down
            log.exception("message_dispatch_failed", topic=topic)

    def _route(self, verdict: Verdict) -> None:
        queue = self.waiters.get(verdict.session_id) if verdict.session_id else None
        holder = self.holders.get(verdict.session_id) if verdict.session_id else None
        if queue is not None and verdict.verifier_id != holder:
            # A late answer from a verifier the session has moved away from: its state now lives elsewhere.
            log.info("verdict_from_former_verifier", session_id=verdict.session_id, seq=verdict.seq,
                     verifier=verdict.verifier_id, holder=holder)
        elif queue is not None:
            queue.put_nowait(verdict)
        elif verdict.kind is VerdictKind.ERROR:
            log.warning("verifier_refused_message", error=str(verdict.error), reason=verdict.reason)
        else:
            log.debug("verdict_unclaimed", session_id=verdict.session_id, seq=verdict.seq)

    def _wake_all(self, sentinel: object) -> None:
        for queue in self.waiters.values():
            queue.put_nowait(sentinel)


def _speaks_for_itself(topic: str, status: Status) -> bool:
    """A status names the verifier of its own topic, by an id we can address (not another verifier's)."""
    try:
        return topics.status_topic(status.verifier_id) == topic
    except ValueError:  # an id that is no topic level: nothing could ever be sent to it
        return False
