"""MQTT topic names, QoS and retain flags: the only place a topic string is spelled.

Drafts and verdicts travel at QoS 0: every round carries a sequence number and the edge retries on
timeout, so broker-level acknowledgements would only add a round trip. Status is QoS 1 and retained,
so an edge that connects later still finds every verifier; verifiers also republish it periodically for
brokers whose retained messages do not reach every subscriber (RabbitMQ's cluster).
"""

from __future__ import annotations

PREFIX = "sled/v1"
ALL = "sled/#"

QOS_DRAFT = 0
QOS_VERDICT = 0
QOS_STATUS = 1
RETAIN_STATUS = True

STATUS_FILTER = f"{PREFIX}/verifiers/+"


def check_name(name: str, what: str) -> str:
    """A device or verifier id must be one topic level: non-empty, no '/', '+', '#'."""
    if not name or len(name) > 64 or any(c in name for c in "/+#\0") or name != name.strip():
        raise ValueError(f"{what} {name!r} must be 1-64 characters without '/', '+', '#' or surrounding spaces")
    return name


def status_topic(verifier: str) -> str:
    return f"{PREFIX}/verifiers/{check_name(verifier, 'verifier id')}"


def draft_topic(verifier: str, device: str) -> str:
    return f"{PREFIX}/drafts/{check_name(verifier, 'verifier id')}/{check_name(device, 'device id')}"


def drafts_filter(verifier: str) -> str:
    """What a verifier subscribes to: drafts from every device, addressed to it."""
    return f"{PREFIX}/drafts/{check_name(verifier, 'verifier id')}/+"


def verdict_topic(device: str) -> str:
    return f"{PREFIX}/verdicts/{check_name(device, 'device id')}"


def device_of_draft_topic(topic: str) -> str | None:
    """The <device> level of a drafts topic, or None if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == f"{PREFIX}/drafts":
        return parts[4]
    return None
