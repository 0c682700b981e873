"""The wire agreement between SLED edge devices and verifiers: messages, topics, limits, MQTT connection."""

from sled_protocol.messages import (
    SCHEMA_VERSION,
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
    decode,
    decode_draft,
    decode_status,
    decode_verdict,
    encode,
)

__all__ = [
    "SCHEMA_VERSION",
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
