"""``sled-inspect``: watch SLED traffic on the broker, one decoded line per message.

Filters by device, session and message type; matches each verdict to its draft to show the round
trip and acceptance; ``--stats`` prints a per-session summary every few seconds instead. The raw
equivalent is ``mosquitto_sub -v -t 'sled/#'`` (payloads are msgpack, so binary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from sled_protocol import Limits, ProtocolError, decode
from sled_protocol import topics
from sled_protocol.acceptance import AcceptanceCounts
from sled_protocol.codec import WIRE_KEYS
from sled_protocol.exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE
from sled_protocol.logs import configure_logging, redact
from sled_protocol.mqtt import make_client
from sled_protocol.run import run_until_signal
from sled_protocol.transport import check_protocol, parse_broker_urls

MAX_PENDING_DRAFTS = 10_000

# An observer shows whatever the broker carries (its max_packet_size is 1 MiB), not only what one verifier's
# limits would accept: a draft over some verifier's limit is still shown as the draft it is.
OBSERVER_LIMITS = Limits(max_message_bytes=1 << 20, max_draft_tokens=1 << 16, max_context_tokens=1 << 31)


def describe(topic: str, payload: bytes, received_s: float, retain: bool = False) -> dict[str, object]:
    """One message as a flat dict: time, topic, message type, device and every field that is set. Never raises:
    a message that cannot be decoded (for any reason) is described as ``undecodable`` with the cause."""
    record: dict[str, object] = {"time": datetime.fromtimestamp(received_s).isoformat(timespec="milliseconds"),
                                 "topic": topic, "bytes": len(payload)}
    if retain:
        record["retained"] = True
    parts = topic.split("/")
    if len(parts) >= 4 and parts[2] == "verdicts":
        record["device"] = parts[3]
    try:
        message = decode(payload, OBSERVER_LIMITS)
    except ProtocolError as exc:
        record.update(type="undecodable", error=str(exc.code), reason=str(exc))
        return record
    except Exception as exc:  # noqa: BLE001 - an observer shows the poison message, it does not die of it
        record.update(type="undecodable", error="internal", reason=f"{exc.__class__.__name__}: {exc}"[:500])
        return record
    record["type"] = type(message).__name__.lower()
    for name, value in message.__dict__.items():
        if value is not None:
            if hasattr(value, "__dataclass_fields__"):
                value = dict(value.__dict__)
            shown = list(value) if isinstance(value, tuple) else (str(value) if hasattr(value, "value") else value)
            record[WIRE_KEYS.get(name, name)] = shown  # the wire's keys: this is what travelled
    return record


@dataclass
class SessionTraffic(AcceptanceCounts):
    """One session's acceptance as the broker carried it, and its round trips."""

    positions_kept = 64  # whatever a draft on the broker claims, an observer's memory per session stays small
    round_trips_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        trips = self.round_trips_ms[-1000:]
        return {"rounds": self.rounds, "draft_tokens": self.draft_tokens, "accepted": self.accepted_tokens,
                "mean_acceptance_length": round(self.mean_acceptance_length, 3),
                "acceptance": round(self.acceptance_rate, 3),
                "rtt_ms_p50": round(statistics.median(trips), 2) if trips else None}


class Matcher:
    """Pairs verdicts with the drafts they answer (by device, session, seq); pure, bounded."""

    def __init__(self) -> None:
        self.pending: OrderedDict[tuple, tuple[float, int]] = OrderedDict()
        self.sessions: dict[tuple[str, str], SessionTraffic] = {}

    def observe(self, record: dict[str, object], now_s: float) -> None:
        key = (record.get("device"), record.get("session"), record.get("seq"))
        if record["type"] == "draft":
            self.pending[key] = (now_s, len(record.get("tokens", [])))
            while len(self.pending) > MAX_PENDING_DRAFTS:
                self.pending.popitem(last=False)
        elif record["type"] == "verdict" and record.get("kind") == "verified" and key in self.pending:
            sent_s, k = self.pending.pop(key)
            traffic = self.sessions.setdefault((str(key[0]), str(key[1])), SessionTraffic())
            traffic.record(k, min(int(record.get("accepted", 0)), k))  # a verdict never accepts more than it was sent
            traffic.round_trips_ms.append((now_s - sent_s) * 1000)
            record["rtt_ms"] = round((now_s - sent_s) * 1000, 2)
            record["acceptance"] = f"{record.get('accepted', 0)}/{k}"


def wanted(record: dict[str, object], device: str | None, session: str | None, kind: str | None) -> bool:
    return ((device is None or record.get("device") == device) and (session is None or record.get("session") == session)
            and (kind is None or record.get("type") == kind))


def render(record: dict[str, object]) -> str:
    head = f"{str(record['time'])[11:]} {record['topic']} {record['type']}"
    rest = " ".join(f"{key}={value}" for key, value in record.items() if key not in ("time", "topic", "type"))
    return f"{head} {rest}"


def render_stats(matcher: Matcher) -> str:
    lines = [f"--- {datetime.now().isoformat(timespec='seconds')}: {len(matcher.sessions)} sessions",
             f"{'device':<20} {'session':<14} {'rounds':>7} {'accepted':>9} {'mean_len':>9} {'accept':>7} {'rtt_p50_ms':>11}"]
    for (device, session), traffic in sorted(matcher.sessions.items()):
        s = traffic.summary()
        lines.append(f"{device:<20} {session:<14} {s['rounds']:>7} {s['accepted']:>9} {s['mean_acceptance_length']:>9} "
                     f"{s['acceptance']:>7} {s['rtt_ms_p50'] if s['rtt_ms_p50'] is not None else '-':>11}")
    return "\n".join(lines)


async def watch(args: argparse.Namespace, url: str, protocol: str) -> None:
    check_protocol(protocol)
    address = parse_broker_urls(url)[0]  # any node of a cluster routes every live message
    matcher, seen = Matcher(), 0
    next_stats_s = time.monotonic() + args.interval_s
    async with make_client(address, f"sled-inspect-{uuid.uuid4().hex[:8]}", protocol=protocol,
                           ca_file=getattr(args, "ca_file", None) or os.environ.get("SLED_CA_FILE") or None) as client:
        await client.subscribe(args.filter, qos=1)
        # On stderr, so stdout stays pure records: scripts (and tests) wait for this line, not for a guess.
        print(f"sled-inspect: subscribed to {args.filter} on {address}", file=sys.stderr, flush=True)
        messages = aiter(client.messages)
        while True:
            try:
                async with asyncio.timeout(max(0.05, next_stats_s - time.monotonic()) if args.stats else None):
                    message = await anext(messages)
            except TimeoutError:
                print(render_stats(matcher), flush=True)
                next_stats_s = time.monotonic() + args.interval_s
                continue
            now_s = time.time()
            record = describe(str(message.topic), bytes(message.payload), now_s, bool(message.retain))
            matcher.observe(record, time.monotonic())
            if not wanted(record, args.device, args.session, args.type):
                continue
            if not args.stats:
                print(json.dumps(record) if args.json else render(record), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                if args.stats:
                    print(render_stats(matcher), flush=True)
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sled-inspect",
        description="Print every SLED message on the broker, decoded, one line each; verdict lines carry the "
                    "round trip (rtt_ms) and acceptance of the draft they answer. "
                    "Raw equivalent: mosquitto_sub -h HOST -p PORT -v -t 'sled/#'",
    )
    parser.add_argument("--mqtt-url", default=None, help="broker URL [env SLED_MQTT_URL; default mqtt://127.0.0.1:1883]")
    parser.add_argument("--mqtt-protocol", default=None,
                        help="MQTT version, 5 or 3.1.1 [env SLED_MQTT_PROTOCOL; default 5]")
    parser.add_argument("--ca-file", default=None,
                        help="CA certificate for mqtts:// [env SLED_CA_FILE; default: the system's CAs]")
    parser.add_argument("--filter", default=topics.ALL, help=f"MQTT topic filter [default {topics.ALL}]")
    parser.add_argument("--device", default=None, help="only this device's drafts and verdicts")
    parser.add_argument("--session", default=None, help="only this session")
    parser.add_argument("--type", choices=["draft", "verdict", "status", "undecodable"], default=None,
                        help="only this message type")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--stats", action="store_true", help="a per-session summary every --interval-s instead of lines")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between --stats summaries [default 5]")
    parser.add_argument("--count", type=int, default=None, help="exit after this many (matching) messages")
    args = parser.parse_args(argv)
    url = args.mqtt_url or os.environ.get("SLED_MQTT_URL", "mqtt://127.0.0.1:1883")
    protocol = args.mqtt_protocol or os.environ.get("SLED_MQTT_PROTOCOL", "5")
    configure_logging("warning")
    try:
        run_until_signal(watch(args, url, protocol))
    except ValueError as exc:  # a URL in the message keeps its account, not its password
        print(f"sled-inspect: {redact(str(exc))}", file=sys.stderr)
        return EX_CONFIG
    except Exception as exc:
        print(f"sled-inspect: {exc.__class__.__name__}: {redact(str(exc))}", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
