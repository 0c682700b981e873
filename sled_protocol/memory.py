"""An in-process broker behind the transport seam, for tests: ``memory://<name>`` in any service's URL.

It keeps the MQTT behaviour SLED relies on: topic filters with ``+`` and ``#``, retained messages
(delivered on subscribe with the retain flag set, live ones without it, as MQTT does; an empty retained payload
clears one), a last will published when a connection
is dropped rather than closed, one connection per client id (a second one takes over and the first is
dropped, as a broker does), and delivery in publish order. It adds no latency, loses nothing and ignores
QoS; ``drop`` and ``drop_all`` stand in for a lost connection or a broker restart. Every service in one
event loop that names the same ``memory://name`` meets on the same ``MemoryBroker``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sled_protocol.transport import BrokerAddress, Message, TransportError, Will, topic_matches

_BROKERS: dict[str, MemoryBroker] = {}


def memory_broker(name: str) -> MemoryBroker:
    """The in-process broker called ``name`` (``memory://name``), created on first use."""
    if name not in _BROKERS:
        _BROKERS[name] = MemoryBroker(name)
    return _BROKERS[name]


def forget_broker(name: str) -> None:
    """Drop every connection of broker ``name`` and forget it (its retained messages go with it)."""
    broker = _BROKERS.pop(name, None)
    if broker is not None:
        broker.drop_all()


class MemoryLink:
    def __init__(self, broker: MemoryBroker, identifier: str) -> None:
        self.broker = broker
        self.identifier = identifier
        self.filters: list[str] = []
        self.inbox: asyncio.Queue[Message | TransportError] = asyncio.Queue()
        self.lost: TransportError | None = None

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        self._check()
        self.broker.route(Message(topic, bytes(payload)), retain=retain)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]], *, qos: int = 0) -> None:
        for topic, payload in messages:
            await self.publish(topic, payload, qos=qos)

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None:
        self._check()
        self.filters.append(topic_filter)
        for topic, payload in list(self.broker.retained.items()):
            if topic_matches(topic, topic_filter):
                self.inbox.put_nowait(Message(topic, payload, retain=True))

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            self._check()
            item = await self.inbox.get()
            if isinstance(item, TransportError):
                raise item
            yield item

    def wants(self, topic: str) -> bool:
        return any(topic_matches(topic, topic_filter) for topic_filter in self.filters)

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost


class MemoryBroker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.links: dict[str, MemoryLink] = {}  # client id -> its one live connection
        self.wills: dict[str, Will] = {}
        self.retained: dict[str, bytes] = {}
        self.published = 0  # messages routed so far (tests read it to see traffic happened)

    def route(self, message: Message, *, retain: bool = False) -> None:
        self.published += 1
        if retain:
            if message.payload:
                self.retained[message.topic] = message.payload
            else:
                self.retained.pop(message.topic, None)
        for link in list(self.links.values()):
            if link.wants(message.topic):
                link.inbox.put_nowait(message)

    def attach(self, link: MemoryLink, will: Will | None) -> None:
        if link.identifier in self.links:  # a client id is one connection: the newer one takes over
            self.drop(link.identifier, reason=f"client id {link.identifier!r} connected again")
        self.links[link.identifier] = link
        if will is not None:
            self.wills[link.identifier] = will

    def detach(self, link: MemoryLink, *, clean: bool) -> None:
        """The end of a connection: a clean disconnect discards the will, anything else publishes it."""
        if self.links.get(link.identifier) is not link:
            return  # already dropped (and its will already published)
        del self.links[link.identifier]
        will = self.wills.pop(link.identifier, None)
        if will is not None and not clean:
            self.route(Message(will.topic, will.payload), retain=will.retain)

    def drop(self, identifier: str, *, reason: str = "dropped by the broker") -> None:
        """Lose one client's connection, as a network failure would: its will is published."""
        link = self.links.get(identifier)
        if link is None:
            return
        link.lost = TransportError(f"memory broker {self.name!r}: {reason}")
        link.inbox.put_nowait(link.lost)
        self.detach(link, clean=False)

    def drop_all(self, reason: str = "broker restarted") -> None:
        for identifier in list(self.links):
            self.drop(identifier, reason=reason)


class MemoryTransport:
    def __init__(self, address: BrokerAddress, *, ca_file: str | None = None, protocol: str = "5") -> None:
        self.address = address  # ca_file and protocol mean nothing in process

    def __str__(self) -> str:
        return str(self.address)

    @asynccontextmanager
    async def connect(self, identifier: str, will: Will | None = None) -> AsyncIterator[MemoryLink]:
        broker = memory_broker(self.address.host)
        link = MemoryLink(broker, identifier)
        broker.attach(link, will)
        clean = False
        try:
            yield link
            clean = True
        except asyncio.CancelledError:
            clean = True  # a service stopping disconnects cleanly (no will), as aiomqtt's client does
            raise
        finally:
            broker.detach(link, clean=clean)
            link.lost = link.lost or TransportError(f"memory broker {broker.name!r}: {identifier!r} disconnected")


Transport = MemoryTransport  # what sled_protocol.transport.transport_for looks up for memory://
