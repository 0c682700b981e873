"""Every SLED wire message, its encoding and the round seeds: one import for all three.

Kept as the historical entry point; the parts live in ``sled_protocol.types`` (the messages and their
enums, ``Limits``, ``SamplingParams``), ``sled_protocol.codec`` (msgpack encoding and strict decoding)
and ``sled_protocol.seeding`` (per-round random seeds).
"""

from __future__ import annotations

from sled_protocol.codec import (PROBABILITY_SUM_TOLERANCE, decode, decode_close, decode_draft, decode_inbound,
                                 decode_status, decode_verdict, encode, message_tag, peek_ids)
from sled_protocol.seeding import STREAM_DRAFT, STREAM_VERIFY, round_seed
from sled_protocol.types import (GREEDY_BELOW_TEMPERATURE, MAX_TEMPERATURE, SCHEMA_VERSION, Close, Draft, ErrorCode,
                                 FinishReason, Limits, Message, NextKind, ProtocolError, SamplingParams, Status,
                                 Verdict, VerdictKind, float32)

__all__ = [
    "GREEDY_BELOW_TEMPERATURE", "MAX_TEMPERATURE", "PROBABILITY_SUM_TOLERANCE", "SCHEMA_VERSION", "STREAM_DRAFT",
    "STREAM_VERIFY", "Close", "Draft", "ErrorCode", "FinishReason", "Limits", "Message", "NextKind", "ProtocolError",
    "SamplingParams", "Status", "Verdict", "VerdictKind", "decode", "decode_close", "decode_draft", "decode_inbound",
    "decode_status", "decode_verdict", "encode", "float32", "message_tag", "peek_ids", "round_seed",
]
