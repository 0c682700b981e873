"""The wire agreement between SLED edge devices and verifiers: messages, topics, limits, MQTT connection."""

from sled_protocol.codec import decode, decode_draft, decode_status, decode_verdict, encode
from sled_protocol.types import (
    SCHEMA_VERSION,
    Close,
    Draft,
    ErrorCode,
    FinishReason,
    Limits,
    NextKind,
    ProtocolError,
    SamplingParams,
    Status,
    Verdict,
    VerdictKind,
)

__all__ = [
    "SCHEMA_VERSION",
    "Close",
    "Draft",
    "ErrorCode",
    "FinishReason",
    "Limits",
    "NextKind",
    "ProtocolError",
    "SamplingParams",
    "Status",
    "Verdict",
    "VerdictKind",
    "decode",
    "decode_draft",
    "decode_status",
    "decode_verdict",
    "encode",
]
