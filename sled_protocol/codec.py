"""Every SLED wire message's msgpack encoding and its strict validation.

Messages are msgpack maps with short string keys, a type tag ``t`` and the schema version ``v``.
Decoders reject a missing or mistyped required field with one ``ProtocolError`` (carrying an
``ErrorCode`` the verifier sends back to the sender) and ignore unknown fields, so a newer peer
may add optional fields without breaking an older one. The message types live in ``sled_protocol.types``.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import msgpack

from sled_protocol.types import (SCHEMA_VERSION, Close, Draft, ErrorCode, FinishReason, Limits, Message, NextKind,
                                 ProtocolError, SamplingParams, Status, Verdict, VerdictKind, is_integer,
                                 is_number)

PROBABILITY_SUM_TOLERANCE = 1e-3

_TAGS = {Draft: "draft", Verdict: "verdict", Status: "status", Close: "close"}
# Attribute -> wire key where the two differ (the code's names follow the glossary; the wire keeps its keys).
WIRE_KEYS = {"device_id": "device", "session_id": "session", "verifier_id": "verifier"}


def encode(message: Message) -> bytes:
    """msgpack bytes of ``message``; None-valued optional fields are left out."""
    body: dict[str, Any] = {"t": _TAGS[type(message)], "v": SCHEMA_VERSION}
    for name, value in message.__dict__.items():
        if value is None:
            continue
        if isinstance(value, SamplingParams):
            value = dict(value.__dict__)
        body[WIRE_KEYS.get(name, name)] = str(value) if isinstance(value, StrEnum) else value
    # Floats travel as float32: proposal probabilities need no more, and SamplingParams is float32 already.
    return msgpack.packb(body, use_bin_type=True, use_single_float=True)


def _unpack(data: bytes, limits: Limits, expected_tag: str | None) -> dict[str, Any]:
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, too_large(len(data), limits))
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, **limits.unpack_limits())
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes (ValueError for its limits)
        raise ProtocolError(ErrorCode.MALFORMED, f"not a SLED msgpack message: {exc.__class__.__name__}: "
                            f"{str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"expected a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # True and 1.0 equal 1 but are not a version
        raise ProtocolError(ErrorCode.MALFORMED, f"schema version {_shown(version)} is not supported (expected {SCHEMA_VERSION})")
    if expected_tag is not None:
        _expect_tag(body, expected_tag)
    return body


def _shown(value: Any) -> str:
    """A received value in a refusal's reason, cut short: the reason travels back and is logged."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def too_large(size: int, limits: Limits) -> str:
    """The refusal of an oversized message, naming the limit and where it comes from."""
    if limits.max_message_bytes == limits.derived_message_bytes:
        return (f"message of {size} bytes exceeds {limits.max_message_bytes}, the most a draft needs at the context "
                f"limit of {limits.max_context_tokens} tokens with {limits.max_draft_tokens} draft tokens and "
                f"proposals of {limits.max_proposal_tokens}")
    return f"message of {size} bytes exceeds the configured max_message_bytes {limits.max_message_bytes}"


def _expect_tag(body: dict[str, Any], tag: str) -> None:
    if body.get("t") != tag:
        raise ProtocolError(ErrorCode.MALFORMED, f"expected a {tag} message, got {_shown(body.get('t'))}")


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.MALFORMED, f"missing required field {name!r}")
        return None
    # bool is an int subclass; a True where a count belongs is a malformed message.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _name(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _field(body, name, str, required=required)
    if value is not None and not (0 < len(value) <= 128):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} must be 1..128 characters")
    return value


def _count(body: dict[str, Any], name: str, minimum: int, *, required: bool = True) -> int | None:
    value = _field(body, name, int, required=required)
    if value is not None and not (minimum <= value < 2**53):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} = {value} is out of range")
    return value


def _tokens(body: dict[str, Any], name: str, max_len: int, limits: Limits, *, required: bool = True):
    value = _field(body, name, list, required=required)
    if value is None:
        return None
    if len(value) > max_len:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"field {name!r} holds {len(value)} tokens, more than {max_len}")
    upper = limits.vocab_size if limits.vocab_size is not None else 2**31
    for token in value:
        if not isinstance(token, int) or isinstance(token, bool):
            raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} must hold integer token ids")
        if not 0 <= token < upper:
            raise ProtocolError(ErrorCode.BAD_TOKEN, f"token id {token} in {name!r} is outside the vocabulary [0, {upper})")
    return tuple(value)


def decode_draft(data: bytes, limits: Limits = Limits()) -> Draft:
    return _draft_body(_unpack(data, limits, "draft"), limits)


def decode_inbound(data: bytes, limits: Limits = Limits()) -> Draft | Close:
    """What a verifier receives on its drafts topic (a Draft or a Close), parsed once."""
    body = _unpack(data, limits, None)
    if body.get("t") == "close":
        return _close_body(body, limits)
    _expect_tag(body, "draft")
    return _draft_body(body, limits)


def _draft_body(body: dict[str, Any], limits: Limits) -> Draft:
    try:
        return _draft_from(body, limits)
    except ProtocolError as exc:
        exc.session_id, exc.seq = _session_of(body.get("session")), _seq_of(body.get("seq"))
        raise


def _session_of(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _seq_of(value: Any) -> int | None:
    return value if is_integer(value) and 0 <= value < 2**53 else None


PEEK_BYTES = 512  # the encoder writes t, v, device, session and seq first: well inside this


def peek_ids(data: bytes) -> tuple[str | None, str | None, int | None]:
    """The type tag, session and seq of a message that is not decoded whole (too large, rate limited, or failing
    anywhere), read from its first ``PEEK_BYTES`` alone so its refusal can reach its session; cheap and never
    raising: (None, None, None) for what cannot be read."""
    fields: dict[str, Any] = {}
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=PEEK_BYTES)
        unpacker.feed(data[:PEEK_BYTES])
        for _ in range(min(unpacker.read_map_header(), 32)):
            key = unpacker.unpack()
            if key in ("t", "session", "seq"):
                fields[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:  # noqa: BLE001 - a partial or hostile message: keep what was read
        pass
    tag = fields.get("t")
    return (tag if isinstance(tag, str) and len(tag) <= 16 else None, _session_of(fields.get("session")),
            _seq_of(fields.get("seq")))


def _draft_from(body: dict[str, Any], limits: Limits) -> Draft:
    base_len = _count(body, "base_len", 1)
    if base_len > limits.max_context_tokens:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"context of {base_len} tokens exceeds {limits.max_context_tokens}")
    draft = Draft(
        device_id=_name(body, "device"),
        session_id=_name(body, "session"),
        seq=_count(body, "seq", 0),
        base_len=base_len,
        tokens=_tokens(body, "tokens", limits.max_draft_tokens, limits),
        max_len=_count(body, "max_len", 1),
        vocab=_name(body, "vocab"),
        context=_tokens(body, "context", limits.max_context_tokens, limits, required=False),
    )
    if draft.max_len > limits.max_context_tokens:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"max_len {draft.max_len} exceeds the context limit {limits.max_context_tokens}")
    if draft.base_len + len(draft.tokens) > draft.max_len:
        raise ProtocolError(ErrorCode.MALFORMED, f"{len(draft.tokens)} draft tokens after {draft.base_len} pass max_len {draft.max_len}")
    if draft.max_len <= draft.base_len:
        raise ProtocolError(ErrorCode.MALFORMED, f"max_len {draft.max_len} leaves no room after base_len {draft.base_len}")
    if draft.context is not None and len(draft.context) != draft.base_len:
        raise ProtocolError(ErrorCode.MALFORMED, f"context holds {len(draft.context)} tokens but base_len is {draft.base_len}")
    sampling = _sampling(body)
    q_ids, q_probs = _proposal(body, len(draft.tokens), limits)
    if (q_ids is not None) and sampling is None:
        raise ProtocolError(ErrorCode.BAD_PROPOSAL, "a proposal needs sampling parameters")
    return Draft(**{**draft.__dict__, "sampling": sampling, "q_ids": q_ids, "q_probs": q_probs})


def _sampling(body: dict[str, Any]) -> SamplingParams | None:
    raw = _field(body, "sampling", dict, required=False)
    if raw is None:
        return None
    # SamplingParams checks types and ranges itself (ProtocolError BAD_SAMPLING): one place for every caller.
    return SamplingParams(raw.get("temperature"), raw.get("top_k", 0), raw.get("top_p", 1.0), raw.get("seed", 0))


def _proposal(body: dict[str, Any], k: int, limits: Limits):
    """Validate the sparse proposal: k rows of at most m unique in-vocabulary ids with probabilities summing to 1."""
    raw_ids, raw_probs = body.get("q_ids"), body.get("q_probs")
    if raw_ids is None and raw_probs is None:
        return None, None
    if not (isinstance(raw_ids, list) and isinstance(raw_probs, list) and len(raw_ids) == len(raw_probs) == k):
        raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"q_ids and q_probs must both hold one row per draft token ({k})")
    upper = limits.vocab_size if limits.vocab_size is not None else 2**31
    ids_rows, prob_rows = [], []
    for position, (ids, probs) in enumerate(zip(raw_ids, raw_probs)):
        if not (isinstance(ids, list) and isinstance(probs, list) and len(ids) == len(probs)):
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"proposal row {position}: ids and probabilities differ in length")
        if not 1 <= len(ids) <= limits.max_proposal_tokens:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"proposal row {position} holds {len(ids)} entries; "
                                f"1..{limits.max_proposal_tokens} allowed")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < upper for t in ids):
            raise ProtocolError(ErrorCode.BAD_TOKEN, f"proposal row {position} has an id outside [0, {upper})")
        if len(set(ids)) != len(ids):
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"proposal row {position} repeats a token id")
        # Each probability in [0, 1] before any arithmetic: finite values near float max overflow math.fsum.
        if not all(isinstance(q, float | int) and not isinstance(q, bool) and 0 <= q <= 1 for q in probs):
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"proposal row {position} has a probability outside [0, 1] "
                                "(negative, above 1, NaN or not a number)")
        if abs(math.fsum(probs) - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"proposal row {position} sums to {math.fsum(probs):.6f}, not 1")
        ids_rows.append(tuple(ids))
        prob_rows.append(tuple(float(q) for q in probs))
    return tuple(ids_rows), tuple(prob_rows)


def _enum(body: dict[str, Any], name: str, enum: type[StrEnum], *, required: bool = False):
    value = _field(body, name, str, required=required)
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} has unknown value {_shown(value)}") from None


def decode_verdict(data: bytes, limits: Limits = Limits()) -> Verdict:
    return _verdict_body(_unpack(data, limits, "verdict"), limits)


def _verdict_body(body: dict[str, Any], limits: Limits) -> Verdict:
    return Verdict(
        kind=_enum(body, "kind", VerdictKind, required=True),
        verifier_id=_name(body, "verifier"),
        session_id=_name(body, "session", required=False),
        seq=_count(body, "seq", 0, required=False),
        accepted=_count(body, "accepted", 0, required=False) or 0,
        next_token=_count(body, "next_token", 0, required=False),
        next_kind=_enum(body, "next_kind", NextKind),
        committed_len=_count(body, "committed_len", 0, required=False) or 0,
        finish=_enum(body, "finish", FinishReason),
        error=_enum(body, "error", ErrorCode),
        reason=_field(body, "reason", str, required=False),
        target=_name(body, "target", required=False),
    )


def decode_status(data: bytes, limits: Limits = Limits()) -> Status:
    return _status_body(_unpack(data, limits, "status"), limits)


def _status_body(body: dict[str, Any], limits: Limits) -> Status:
    return Status(
        verifier_id=_name(body, "verifier"),
        online=_field(body, "online", bool),
        model=_field(body, "model", str, required=False) or "",
        vocab=_field(body, "vocab", str, required=False) or "",
        vocab_size=_count(body, "vocab_size", 0, required=False) or 0,
        load=_count(body, "load", 0, required=False) or 0,
        capacity=_count(body, "capacity", 0, required=False) or 0,
        max_draft_tokens=_count(body, "max_draft_tokens", 0, required=False) or 0,
        max_context_tokens=_count(body, "max_context_tokens", 0, required=False) or 0,
        target=_name(body, "target", required=False),
        step_cost=_step_cost(body),
        free_sessions=_count(body, "free_sessions", 0, required=False),
    )


def _step_cost(body: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """Four finite, non-negative numbers, or None when absent (a peer that announces no price)."""
    value = _field(body, "step_cost", list, required=False)
    if value is None:
        return None
    if len(value) != 4 or not all(is_number(v) and math.isfinite(v) and v >= 0 for v in value):
        raise ProtocolError(ErrorCode.MALFORMED, "field 'step_cost' must be 4 finite non-negative numbers")
    return tuple(float(v) for v in value)


def _close_body(body: dict[str, Any], limits: Limits) -> Close:
    return Close(device_id=_name(body, "device"), session_id=_name(body, "session"))


_BODY_DECODERS = {"draft": _draft_body, "verdict": _verdict_body, "status": _status_body, "close": _close_body}


def decode(data: bytes, limits: Limits = Limits()) -> Message:
    """Decode any SLED message by its type tag (used by sled-inspect)."""
    body = _unpack(data, limits, None)
    tag = body.get("t")
    if not isinstance(tag, str) or tag not in _BODY_DECODERS:  # a list or map tag is unhashable
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown message type {_shown(tag)}")
    return _BODY_DECODERS[tag](body, limits)
