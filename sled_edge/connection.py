"""The device's broker connection: connect, subscribe, dispatch, and reconnect with backoff forever (to the
next of the configured brokers, when they are a cluster's nodes).

The connection task is its own supervisor: a lost broker and an unexpected error alike (logged with its
traceback) clear ``connected`` and restart it after a backoff, so a waiting session either sees the
connection come back or runs out its outage budget; it never retries against a dead task. A message
that fails to dispatch is logged and dropped, never the connection.

Verdicts go to the waiting session's queue (by session id) when they come from the verifier holding that
session (``session_verifier``; a former holder's late answers are dropped); verifier statuses update
``verifiers``.
Sessions learn of events that need a resend now rather than after a timeout through sentinels put
in their queues: RECONNECTED (the broker came back; in-flight rounds may be lost) and VERIFIER_DOWN
(the verifier serving that session published offline, e.g. its last will after a crash).
"""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import structlog

from sled_protocol import ProtocolError, Status, Verdict, VerdictKind, decode_status, decode_verdict
from sled_protocol import topics
from sled_protocol.mqtt import BrokerAddress, backoff_s, describe_brokers, make_client

log = structlog.get_logger("sled_edge")

RECONNECTED = object()
VERIFIER_DOWN = object()


class BrokerUnavailable(ConnectionError):
    """The first connection to the broker failed (later losses are retried)."""


class EdgeConnection:
    def __init__(self, addresses: list[BrokerAddress], device_id: str, ca_file: str | None = None,
                 protocol: str = "5") -> None:
        self.addresses = addresses
        self.device_id = device_id
        self.ca_file = ca_file
        self.protocol = protocol
        self.verifiers: dict[str, Status] = {}
        self.status_changed = asyncio.Event()
        self.connected = asyncio.Event()
        self.waiters: dict[str, asyncio.Queue] = {}
        self.session_verifier: dict[str, str] = {}
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None
        self.reconnects = 0
        self.last_error: BaseException | None = None  # why the latest attempt failed, for the start-up error

    async def start(self, timeout_s: float) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-connection")
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

    async def _run(self) -> None:
        attempt = failures = 0
        while True:
            address = self.addresses[failures % len(self.addresses)]  # after a failure, the next node
            try:
                identifier = f"sled-edge-{self.device_id}-{uuid.uuid4().hex[:8]}"
                async with make_client(address, identifier, ca_file=self.ca_file, protocol=self.protocol) as client:
                    await client.subscribe(topics.verdict_topic(self.device_id), qos=topics.QOS_VERDICT)
                    await client.subscribe(topics.STATUS_FILTER, qos=topics.QOS_STATUS)
                    self._client = client
                    self.connected.set()
                    if attempt:
                        self.reconnects += 1
                        log.warning("broker_reconnected", broker=str(address))
                        self._wake_all(RECONNECTED)
                    attempt = 0
                    async for message in client.messages:
                        self._dispatch(str(message.topic), bytes(message.payload))
            except Exception as exc:  # supervision: any failure, expected or not, restarts the connection
                self.connected.clear()
                self._client = None
                self.last_error = exc
                delay = backoff_s(attempt)
                attempt += 1
                failures += 1
                if isinstance(exc, aiomqtt.MqttError):
                    log.warning("broker_connection_lost", broker=str(address), error=str(exc),
                                retry_in_s=round(delay, 2))
                else:
                    log.exception("broker_connection_failed", broker=str(address), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """Publish once connected; TimeoutError when the broker stays away (the caller resends later)."""
        async with asyncio.timeout(timeout_s):
            while True:
                await self.connected.wait()
                client = self._client
                try:
                    await client.publish(topic, payload, qos=topics.QOS_DRAFT)
                    return
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.05)  # the connection task owns `connected` and reconnects

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            if topic == topics.verdict_topic(self.device_id):
                self._route(decode_verdict(payload))
            elif aiomqtt.Topic(topic).matches(topics.STATUS_FILTER):
                status = decode_status(payload)
                was_online = self.verifiers.get(status.verifier, status).online
                self.verifiers[status.verifier] = status
                self.status_changed.set()
                if was_online and not status.online:
                    log.warning("verifier_offline", verifier=status.verifier)
                    for session_id, verifier in list(self.session_verifier.items()):
                        if verifier == status.verifier and session_id in self.waiters:
                            self.waiters[session_id].put_nowait(VERIFIER_DOWN)
        except ProtocolError as exc:
            log.warning("message_undecodable", topic=topic, error=str(exc))
        except Exception:  # a bug handling one message must not take the connection (and every session) down
            log.exception("message_dispatch_failed", topic=topic)

    def _route(self, verdict: Verdict) -> None:
        queue = self.waiters.get(verdict.session) if verdict.session else None
        holder = self.session_verifier.get(verdict.session) if verdict.session else None
        if queue is not None and holder is not None and verdict.verifier != holder:
            # A late answer from a verifier the session has moved away from: its state now lives elsewhere.
            log.info("verdict_from_former_verifier", session_id=verdict.session, seq=verdict.seq,
                     verifier=verdict.verifier, holder=holder)
        elif queue is not None:
            queue.put_nowait(verdict)
        elif verdict.kind is VerdictKind.ERROR:
            log.warning("verifier_refused_message", error=str(verdict.error), reason=verdict.reason)
        else:
            log.debug("verdict_unclaimed", session_id=verdict.session, seq=verdict.seq)

    def _wake_all(self, sentinel: object) -> None:
        for queue in self.waiters.values():
            queue.put_nowait(sentinel)
