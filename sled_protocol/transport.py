"""The transport seam: what SLED's services need from a message broker, as a small Protocol.

A ``Transport`` opens a ``Link`` (one live connection) with a client id and an optional last will; a
``Link`` publishes, subscribes, and yields the ``Message``s of its subscriptions. Every failure of a
connection, whatever the library underneath, surfaces as one ``TransportError``. The services
(``sled_edge.connection``, ``sled_verifier.service``) speak only to these types, through the one
reconnect loop in ``sled_protocol.connection``; no module outside ``sled_protocol`` imports aiomqtt.

A broker is chosen by the scheme of its URL (``SCHEMES``): ``mqtt://`` and ``mqtts://`` are aiomqtt
(``sled_protocol.mqtt``), ``memory://name`` is an in-process broker for tests (``sled_protocol.memory``).
Another broker is one new module with a class ``Transport(address, *, ca_file, protocol)`` and one
line here.
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

__all__ = ["MQTT_PROTOCOLS", "SCHEMES", "BrokerAddress", "Link", "Message", "Transport", "TransportError", "Will",
           "check_ca_file", "check_protocol", "describe_brokers", "parse_broker_url", "parse_broker_urls",
           "topic_matches", "transport_for"]


class TransportError(ConnectionError):
    """A broker connection that failed or was lost; the reconnect loop retries it. Lower-level errors
    (aiomqtt's MqttError, socket errors) are translated into this at the transport's boundary."""


@dataclass(frozen=True)
class Message:
    """One inbound message. ``retain``: the broker delivered it from its store of retained messages (sent
    before this subscription), not live; a receiver that must never act on stale or planted input (a
    verifier's drafts) drops it."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Will:
    """Published by the broker for a client whose connection ends without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class Link(Protocol):
    """One live broker connection; any method raises TransportError once it is lost."""

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None: ...

    async def publish_many(self, messages: Sequence[tuple[str, bytes]], *, qos: int = 0) -> None:
        """Publish each (topic, payload), in order, not retained: a verification step's verdicts. At QoS 0 every
        one is handed to the connection before any is waited on (written together, no loop turn each)."""
        ...

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None: ...

    def messages(self) -> AsyncIterator[Message]:
        """Every message of this link's subscriptions, in arrival order, until the link is lost."""
        ...


class Transport(Protocol):
    """How to reach one broker (one node of a cluster). ``str()`` names it for logs and errors."""

    def connect(self, identifier: str, will: Will | None = None) -> AbstractAsyncContextManager[Link]:
        """``async with transport.connect(id) as link``: connected inside, disconnected cleanly after."""
        ...


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    scheme: str = ""  # empty: mqtts when tls, else mqtt

    def __post_init__(self) -> None:
        if not self.scheme:
            object.__setattr__(self, "scheme", "mqtts" if self.tls else "mqtt")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")


# scheme -> (module with a ``Transport`` class, default port, TLS)
SCHEMES: dict[str, tuple[str, int, bool]] = {
    "mqtt": ("sled_protocol.mqtt", 1883, False),
    "mqtts": ("sled_protocol.mqtt", 8883, True),
    "memory": ("sled_protocol.memory", 0, False),
}


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]``, ``mqtts://...`` (TLS, default port 8883) or ``memory://name``."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"MQTT URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    _, default_port, tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"MQTT URL {url!r} has an invalid port") from None
    return BrokerAddress(
        host=parts.hostname, port=port, tls=tls, scheme=parts.scheme,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_broker_urls(urls: str) -> list[BrokerAddress]:
    """One URL or several separated by commas (the nodes of a cluster), in the order they are tried."""
    return [parse_broker_url(url.strip()) for url in urls.split(",")]


MQTT_PROTOCOLS = ("5", "3.1.1")  # the MQTT versions a broker URL may be spoken with (``--mqtt-protocol``)


def check_protocol(protocol: str) -> None:
    if protocol not in MQTT_PROTOCOLS:
        raise ValueError(f"MQTT protocol {protocol!r} must be one of {', '.join(MQTT_PROTOCOLS)}")


def check_ca_file(path: str) -> None:
    """ValueError unless ``path`` holds at least one readable CA certificate (what TLS will load later)."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:  # missing, unreadable, a directory, or no certificate in it
        raise ValueError(f"cannot read CA certificate {path!r}: {exc.strerror or exc}") from None


def describe_brokers(addresses: list[BrokerAddress]) -> str:
    return ",".join(map(str, addresses))


def transport_for(address: BrokerAddress, *, ca_file: str | None = None, protocol: str = "5") -> Transport:
    """The transport of ``address``'s scheme (its module is imported only now: a pure caller stays pure)."""
    module = importlib.import_module(SCHEMES[address.scheme][0])
    return module.Transport(address, ca_file=ca_file, protocol=protocol)


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT filter matching: ``+`` is one level, a trailing ``#`` any number (including none)."""
    levels, patterns = topic.split("/"), topic_filter.split("/")
    for index, pattern in enumerate(patterns):
        if pattern == "#":
            return index == len(patterns) - 1
        if index >= len(levels) or (pattern != "+" and pattern != levels[index]):
            return False
    return len(levels) == len(patterns)
