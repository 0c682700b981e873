"""Every SLED wire message, its msgpack encoding and its strict validation.

Messages are msgpack maps with short string keys, a type tag ``t`` and the schema version ``v``.
Decoders reject a missing or mistyped required field with one ``ProtocolError`` (carrying an
``ErrorCode`` the verifier sends back to the sender) and ignore unknown fields, so a newer peer
may add optional fields without breaking an older one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import math
import struct

import msgpack

SCHEMA_VERSION = 1


class ErrorCode(StrEnum):
    MALFORMED = "malformed"            # not msgpack, wrong types, missing fields
    TOO_LARGE = "too_large"            # message bytes, draft length or context over a limit
    BAD_TOKEN = "bad_token"            # token id outside the target's vocabulary
    VOCAB_MISMATCH = "vocab_mismatch"  # the draft's tokenizer is not the target's
    WRONG_DEVICE = "wrong_device"      # message device differs from its topic's device level
    SESSION_FINISHED = "session_finished"
    BAD_PROPOSAL = "bad_proposal"      # draft probabilities negative, NaN, not summing to 1, duplicated ids
    BAD_SAMPLING = "bad_sampling"      # temperature, top_k, top_p or seed out of range
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"      # this device sent more drafts per second than allowed
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that breaks the wire agreement; ``code`` says which rule, ``str()`` says how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        # Best-effort identity of the offending message, so the refusal can reach the right session.
        self.session: str | None = None
        self.seq: int | None = None


class VerdictKind(StrEnum):
    VERIFIED = "verified"  # the draft was verified; accepted/next_token say how it went
    RESYNC = "resync"      # the verifier lacks this session's state: resend with full context
    ERROR = "error"        # the message was refused; error/reason say why


class NextKind(StrEnum):
    RECOVERED = "recovered"  # the target's token at the first rejected position
    BONUS = "bonus"          # the target's token after the last (accepted) draft token


class FinishReason(StrEnum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"  # the edge stopped at an app's stop sequence (never sent by a verifier)


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; the verifier's limits are published in its Status."""

    max_message_bytes: int = 1 << 20
    max_draft_tokens: int = 32
    max_context_tokens: int = 8192
    vocab_size: int | None = None  # when known, every token id must be below it
    max_proposal_tokens: int = 64  # m: entries of the sparse proposal per draft position


PROBABILITY_SUM_TOLERANCE = 1e-3


def float32(value: float) -> float:
    """``value`` rounded to float32, the precision every float travels with on the wire."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


GREEDY_BELOW_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How a session samples; applied identically to the target's and the draft's logits.

    Warping follows transformers' order and semantics: temperature, then top-k (ties with the k-th
    logit kept), then top-p (the smallest set of most likely tokens whose mass reaches top_p).
    Floats are rounded to float32 on construction, so both ends use bit-identical values. A temperature
    below ``GREEDY_BELOW_TEMPERATURE`` becomes 0 (greedy), at both ends: dividing float32 logits by it
    could overflow to inf and warp into NaN probabilities, and its distribution is the argmax anyway.
    """

    temperature: float = 1.0
    top_k: int = 0       # 0: off
    top_p: float = 1.0   # 1.0: off
    seed: int = 0

    def __post_init__(self) -> None:
        temperature = float32(self.temperature)
        object.__setattr__(self, "temperature", 0.0 if 0 <= temperature < GREEDY_BELOW_TEMPERATURE else temperature)
        object.__setattr__(self, "top_p", float32(self.top_p))


@dataclass(frozen=True)
class Draft:
    """One round of one session: k draft tokens proposed after the committed prefix of length base_len.

    ``context`` is the full committed history x[0:base_len]; an edge sends it when it opens a session
    or answers a resync, and omits it otherwise.
    """

    device: str
    session: str
    seq: int
    base_len: int
    tokens: tuple[int, ...]
    max_len: int
    vocab: str
    context: tuple[int, ...] | None = None
    # Sampling (None: greedy). q_ids/q_probs: per draft position, the sparse proposal q' the token was
    # sampled from (token ids and probabilities summing to 1); absent: a deterministic draft.
    sampling: SamplingParams | None = None
    q_ids: tuple[tuple[int, ...], ...] | None = None
    q_probs: tuple[tuple[float, ...], ...] | None = None


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer to one Draft (or to an undecodable message, with session None)."""

    kind: VerdictKind
    verifier: str
    session: str | None
    seq: int | None
    accepted: int = 0
    next_token: int | None = None
    next_kind: NextKind | None = None
    committed_len: int = 0
    finish: FinishReason | None = None
    error: ErrorCode | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Status:
    """A verifier's retained status; its MQTT last will is the same with online False."""

    verifier: str
    online: bool
    model: str = ""
    vocab: str = ""
    vocab_size: int = 0
    load: int = 0
    capacity: int = 0
    max_draft_tokens: int = 0
    max_context_tokens: int = 0
    # Identity of the exact target (a hash over its configuration and weights, sled_verifier.identity);
    # sessions move only between verifiers announcing the same one. None: a peer that announces none.
    target: str | None = None


@dataclass(frozen=True)
class Close:
    """An edge ending a session the verifier still holds (a stop sequence, a cancelled request, an error):
    the verifier frees its state at once instead of waiting for LRU eviction. No answer is sent."""

    device: str
    session: str


_TAGS = {Draft: "draft", Verdict: "verdict", Status: "status", Close: "close"}


def encode(message: Draft | Verdict | Status | Close) -> bytes:
    """msgpack bytes of ``message``; None-valued optional fields are left out."""
    body: dict[str, Any] = {"t": _TAGS[type(message)], "v": SCHEMA_VERSION}
    for name, value in message.__dict__.items():
        if value is None:
            continue
        if isinstance(value, SamplingParams):
            value = dict(value.__dict__)
        body[name] = str(value) if isinstance(value, StrEnum) else value
    # Floats travel as float32: proposal probabilities need no more, and SamplingParams is float32 already.
    return msgpack.packb(body, use_bin_type=True, use_single_float=True)


def _unpack(data: bytes, limits: Limits, expected_tag: str | None) -> dict[str, Any]:
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack message: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"expected a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise ProtocolError(ErrorCode.MALFORMED, f"schema version {version!r} is not supported (expected {SCHEMA_VERSION})")
    if expected_tag is not None:
        _expect_tag(body, expected_tag)
    return body


def _expect_tag(body: dict[str, Any], tag: str) -> None:
    if body.get("t") != tag:
        raise ProtocolError(ErrorCode.MALFORMED, f"expected a {tag} message, got {body.get('t')!r}")


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
        session, seq = body.get("session"), body.get("seq")
        exc.session = session if isinstance(session, str) and 0 < len(session) <= 128 else None
        exc.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**53 else None
        raise


def _draft_from(body: dict[str, Any], limits: Limits) -> Draft:
    base_len = _count(body, "base_len", 1)
    if base_len > limits.max_context_tokens:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"context of {base_len} tokens exceeds {limits.max_context_tokens}")
    draft = Draft(
        device=_name(body, "device"),
        session=_name(body, "session"),
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
    temperature, top_p = raw.get("temperature"), raw.get("top_p", 1.0)
    top_k, seed = raw.get("top_k", 0), raw.get("seed", 0)
    if not all(isinstance(x, float | int) and not isinstance(x, bool) for x in (temperature, top_p)):
        raise ProtocolError(ErrorCode.BAD_SAMPLING, "sampling.temperature and sampling.top_p must be numbers")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (top_k, seed)):
        raise ProtocolError(ErrorCode.BAD_SAMPLING, "sampling.top_k and sampling.seed must be integers")
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 100.0):
        raise ProtocolError(ErrorCode.BAD_SAMPLING, f"temperature {temperature} is outside [0, 100]")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ProtocolError(ErrorCode.BAD_SAMPLING, f"top_p {top_p} is outside (0, 1]")
    if not (0 <= top_k < 2**31 and 0 <= seed < 2**63):
        raise ProtocolError(ErrorCode.BAD_SAMPLING, "top_k or seed is out of range")
    return SamplingParams(float(temperature), top_k, float(top_p), seed)


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
        if not all(isinstance(q, float | int) and not isinstance(q, bool) and math.isfinite(q) and q >= 0 for q in probs):
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, f"proposal row {position} has a negative or non-finite probability")
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
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} has unknown value {value!r}") from None


def decode_verdict(data: bytes, limits: Limits = Limits()) -> Verdict:
    return _verdict_body(_unpack(data, limits, "verdict"), limits)


def _verdict_body(body: dict[str, Any], limits: Limits) -> Verdict:
    return Verdict(
        kind=_enum(body, "kind", VerdictKind, required=True),
        verifier=_name(body, "verifier"),
        session=_name(body, "session", required=False),
        seq=_count(body, "seq", 0, required=False),
        accepted=_count(body, "accepted", 0, required=False) or 0,
        next_token=_count(body, "next_token", 0, required=False),
        next_kind=_enum(body, "next_kind", NextKind),
        committed_len=_count(body, "committed_len", 0, required=False) or 0,
        finish=_enum(body, "finish", FinishReason),
        error=_enum(body, "error", ErrorCode),
        reason=_field(body, "reason", str, required=False),
    )


def decode_status(data: bytes, limits: Limits = Limits()) -> Status:
    return _status_body(_unpack(data, limits, "status"), limits)


def _status_body(body: dict[str, Any], limits: Limits) -> Status:
    return Status(
        verifier=_name(body, "verifier"),
        online=_field(body, "online", bool),
        model=_field(body, "model", str, required=False) or "",
        vocab=_field(body, "vocab", str, required=False) or "",
        vocab_size=_count(body, "vocab_size", 0, required=False) or 0,
        load=_count(body, "load", 0, required=False) or 0,
        capacity=_count(body, "capacity", 0, required=False) or 0,
        max_draft_tokens=_count(body, "max_draft_tokens", 0, required=False) or 0,
        max_context_tokens=_count(body, "max_context_tokens", 0, required=False) or 0,
        target=_name(body, "target", required=False),
    )


def decode_close(data: bytes, limits: Limits = Limits()) -> Close:
    return _close_body(_unpack(data, limits, "close"), limits)


def _close_body(body: dict[str, Any], limits: Limits) -> Close:
    return Close(device=_name(body, "device"), session=_name(body, "session"))


def message_tag(data: bytes, limits: Limits = Limits()) -> str | None:
    """The type tag of a message (for routing), or ProtocolError when it is not a SLED message."""
    tag = _unpack(data, limits, None).get("t")
    return tag if isinstance(tag, str) else None


_BODY_DECODERS = {"draft": _draft_body, "verdict": _verdict_body, "status": _status_body, "close": _close_body}


def decode(data: bytes, limits: Limits = Limits()) -> Draft | Verdict | Status | Close:
    """Decode any SLED message by its type tag (used by sled-inspect)."""
    body = _unpack(data, limits, None)
    tag = body.get("t")
    if tag not in _BODY_DECODERS:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown message type {tag!r}")
    return _BODY_DECODERS[tag](body, limits)


# Independent random streams per round: the edge's draft sampling and the verifier's acceptance tests
# must never share uniforms (that would correlate d_i with its acceptance test and bias the output).
STREAM_DRAFT = 1
STREAM_VERIFY = 2


def round_seed(seed: int, committed_len: int, stream: int) -> int:
    """A 63-bit seed for one round of one session (splitmix64 over seed, length and stream).

    Seeding by committed length rather than by round number makes a seeded session reproduce its
    output even across retries and resyncs: the same prefix always meets the same random numbers.
    """
    x = (seed * 0x9E3779B97F4A7C15 + committed_len * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * multiplier) % 2**64
    return (x ^ (x >> 31)) & (2**63 - 1)
