"""``sled-inspect``: watch SLED traffic on the broker, one decoded line per message.

The raw equivalent is ``mosquitto_sub -v -t 'sled/#'`` (payloads are msgpack, so binary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime

from sled_protocol import ProtocolError, decode
from sled_protocol import topics
from sled_protocol.logs import configure_logging
from sled_protocol.mqtt import make_client, parse_mqtt_url
from sled_protocol.run import run_until_signal


def describe(topic: str, payload: bytes, received_s: float) -> dict[str, object]:
    """One message as a flat dict: time, topic, message type and every field that is set."""
    record: dict[str, object] = {"time": datetime.fromtimestamp(received_s).isoformat(timespec="milliseconds"),
                                 "topic": topic, "bytes": len(payload)}
    try:
        message = decode(payload)
    except ProtocolError as exc:
        record.update(type="undecodable", error=str(exc.code), reason=str(exc))
        return record
    record["type"] = type(message).__name__.lower()
    for name, value in message.__dict__.items():
        if value is not None:
            record[name] = list(value) if isinstance(value, tuple) else (str(value) if hasattr(value, "value") else value)
    return record


def render(record: dict[str, object]) -> str:
    head = f"{record['time'][11:]} {record['topic']} {record['type']}"
    rest = " ".join(f"{key}={value}" for key, value in record.items() if key not in ("time", "topic", "type"))
    return f"{head} {rest}"


async def watch(mqtt_url: str, topic_filter: str, as_json: bool, count: int | None) -> None:
    address = parse_mqtt_url(mqtt_url)
    seen = 0
    async with make_client(address, f"sled-inspect-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic_filter, qos=1)
        async for message in client.messages:
            record = describe(str(message.topic), bytes(message.payload), time.time())
            print(json.dumps(record) if as_json else render(record), flush=True)
            seen += 1
            if count is not None and seen >= count:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sled-inspect",
        description="Print every SLED message on the broker, decoded, one line each. "
                    "Raw equivalent: mosquitto_sub -h HOST -p PORT -v -t 'sled/#'",
    )
    parser.add_argument("--mqtt-url", default=None, help="broker URL [env SLED_MQTT_URL; default mqtt://127.0.0.1:1883]")
    parser.add_argument("--filter", default=topics.ALL, help=f"MQTT topic filter [default {topics.ALL}]")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--count", type=int, default=None, help="exit after this many messages")
    args = parser.parse_args(argv)
    import os

    url = args.mqtt_url or os.environ.get("SLED_MQTT_URL", "mqtt://127.0.0.1:1883")
    configure_logging("warning")
    try:
        run_until_signal(watch(url, args.filter, args.json, args.count))
    except ValueError as exc:
        print(f"sled-inspect: {exc}", file=sys.stderr)
        return 78
    except Exception as exc:
        print(f"sled-inspect: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 69
    return 0


if __name__ == "__main__":
    sys.exit(main())
