"""The one way SLED connects to a broker: URL parsing, TCP_NODELAY at our end, the MQTT version, backoff.

TCP_NODELAY matters: without it at both ends (the broker's ``set_tcp_nodelay true`` and the client's
socket option) Nagle's algorithm holds small draft messages back and a round trip costs ~90 ms
instead of ~0.5 ms.

MQTT 5 by default; "3.1.1" for brokers that speak nothing newer (RabbitMQ 3.10's MQTT plugin). SLED uses
nothing that 3.1.1 lacks: QoS 0 and 1, retained messages, a retained last will, clean sessions, no
properties. A URL may list several brokers, the nodes of one cluster (``mqtt://a:1883,mqtt://b:1883``):
a client connects to one and moves to the next after each failed or lost connection.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, default port 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"MQTT URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"MQTT URL {url!r} has an invalid port") from None
    return BrokerAddress(
        host=parts.hostname, port=port, tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_mqtt_urls(urls: str) -> list[BrokerAddress]:
    """One URL or several separated by commas (the nodes of a cluster), in the order they are tried."""
    return [parse_mqtt_url(url.strip()) for url in urls.split(",")]


def describe_brokers(addresses: list[BrokerAddress]) -> str:
    return ",".join(map(str, addresses))


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"MQTT protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")


def check_ca_file(path: str) -> None:
    """ValueError unless ``path`` holds at least one readable CA certificate (what TLS will load later)."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:  # missing, unreadable, a directory, or no certificate in it
        raise ValueError(f"cannot read CA certificate {path!r}: {exc.strerror or exc}") from None


def make_client(address: BrokerAddress, identifier: str, *, will: aiomqtt.Will | None = None,
                keepalive_s: int = 30, ca_file: str | None = None, protocol: str = "5") -> aiomqtt.Client:
    """An aiomqtt client (use as ``async with``) speaking MQTT ``protocol`` ("5" or "3.1.1") with Nagle off;
    for mqtts:// the broker's certificate is checked against ``ca_file`` (default: the system's CAs).

    With an account (a username in the URL) the client id is the username, ``identifier`` only without
    one: the production broker (``use_username_as_clientid``) replaces any other id by the username, so
    the id our logs show is the broker's, and an account is one connection at a time."""
    tls_params = aiomqtt.TLSParameters(ca_certs=ca_file) if address.tls else None
    return aiomqtt.Client(
        address.host, address.port, identifier=address.username or identifier, protocol=PROTOCOLS[protocol],
        username=address.username, password=address.password, will=will, keepalive=keepalive_s,
        socket_options=NODELAY, tls_params=tls_params, timeout=10,
    )


def backoff_s(attempt: int, *, base_s: float = 0.2, cap_s: float = 10.0) -> float:
    """Reconnect delay after ``attempt`` consecutive failures: exponential, capped."""
    return min(cap_s, base_s * (2 ** min(attempt, 16)))
