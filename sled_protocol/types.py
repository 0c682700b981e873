"""The SLED wire messages as frozen dataclasses, their enums, the receiver's limits and the one ProtocolError.

What travels (ARCHITECTURE.md, message flow): a ``Draft`` from the edge, a ``Verdict`` back, a verifier's
retained ``Status``, and a ``Close`` when an edge ends a session early. ``sled_protocol.codec`` turns them
into msgpack bytes and back; ``SamplingParams`` checks its own ranges here, once, for every caller.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import StrEnum

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
        self.session_id: str | None = None
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


def message_bytes_for(max_context_tokens: int, max_draft_tokens: int, max_proposal_tokens: int) -> int:
    """The most bytes a valid draft can take: the full context and k draft tokens as uint32 (5 bytes each), k rows of
    m proposal ids and float64 probabilities (5 + 9 bytes each; our encoder sends float32), three names of 128
    characters, and 1 KiB for keys, sampling and headers. 36.6 KiB at the defaults (4096, 16, 64)."""
    tokens = 5 * (max_context_tokens + max_draft_tokens)
    proposal = max_draft_tokens * (14 * max_proposal_tokens + 6)
    return tokens + proposal + 3 * 131 + 1024


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; the verifier's limits are published in its Status.

    These defaults are the verifier's defaults too: ``VerifierConfig`` takes its ``max_message_bytes``,
    ``max_draft_tokens`` and ``max_context_tokens`` defaults from here, so the two cannot disagree.
    ``max_message_bytes`` 0 (the default) is derived from the others (``message_bytes_for``): no byte more than
    a draft at the context limit needs. The msgpack decoder is held to the same limits before it allocates
    (``unpack_limits``): no array longer than the context, no map or string longer than a message needs.
    """

    max_message_bytes: int = 0
    max_draft_tokens: int = 16
    max_context_tokens: int = 4096
    vocab_size: int | None = None  # when known, every token id must be below it
    max_proposal_tokens: int = 64  # m: entries of the sparse proposal per draft position
    max_map_entries: int = 64      # keys of one map: a draft has 16, room is left for a newer peer's fields
    max_str_bytes: int = 8192      # one string (or binary): names are 128 characters, a verdict's reason a line

    def __post_init__(self) -> None:
        if not self.max_message_bytes:
            object.__setattr__(self, "max_message_bytes", self.derived_message_bytes)

    @property
    def derived_message_bytes(self) -> int:
        return message_bytes_for(self.max_context_tokens, self.max_draft_tokens, self.max_proposal_tokens)

    def unpack_limits(self) -> dict[str, int]:
        """msgpack's own bounds, checked as it reads each header (before it allocates the container)."""
        array = max(self.max_context_tokens, self.max_draft_tokens, self.max_proposal_tokens)
        return {"max_array_len": array, "max_map_len": self.max_map_entries, "max_str_len": self.max_str_bytes,
                "max_bin_len": self.max_str_bytes, "max_ext_len": self.max_str_bytes}


def float32(value: float) -> float:
    """``value`` rounded to float32, the precision every float travels with on the wire."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


GREEDY_BELOW_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0


def is_number(value: object) -> bool:
    """An int or a float, not a bool (an int subclass: a True where a number belongs is malformed input)."""
    return isinstance(value, float | int) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How a session samples; applied identically to the target's and the draft's logits.

    Warping follows transformers' order and semantics: temperature, then top-k (ties with the k-th
    logit kept), then top-p (the smallest set of most likely tokens whose mass reaches top_p).
    Floats are rounded to float32 on construction, so both ends use bit-identical values. A temperature
    below ``GREEDY_BELOW_TEMPERATURE`` becomes 0 (greedy), at both ends: dividing float32 logits by it
    could overflow to inf and warp into NaN probabilities, and its distribution is the argmax anyway.

    The one place the ranges are checked: temperature in [0, MAX_TEMPERATURE], top_p in (0, 1], top_k in
    [0, 2**31), seed in [0, 2**63). Anything else raises ``ProtocolError(BAD_SAMPLING)`` (a ValueError),
    whether it came off the wire, from a command line or from an HTTP request.
    """

    temperature: float = 1.0
    top_k: int = 0       # 0: off
    top_p: float = 1.0   # 1.0: off
    seed: int = 0

    def __post_init__(self) -> None:
        self._check()
        temperature = float32(self.temperature)
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature)
        top_p = float32(self.top_p)
        if top_p == 0.0:  # checked as float32 too: a positive top_p below float32's range would travel as 0
            raise ProtocolError(ErrorCode.BAD_SAMPLING, f"top_p {self.top_p} is 0 in float32, the precision it travels with")
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "seed", int(self.seed))

    def _check(self) -> None:
        temperature, top_p = self.temperature, self.top_p
        if not (is_number(temperature) and is_number(top_p)):
            raise ProtocolError(ErrorCode.BAD_SAMPLING, "sampling temperature and top_p must be numbers")
        if not (is_integer(self.top_k) and is_integer(self.seed)):
            raise ProtocolError(ErrorCode.BAD_SAMPLING, "sampling top_k and seed must be integers")
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise ProtocolError(ErrorCode.BAD_SAMPLING, f"temperature {temperature} is outside [0, {MAX_TEMPERATURE:g}]")
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise ProtocolError(ErrorCode.BAD_SAMPLING, f"top_p {top_p} is outside (0, 1]")
        if not 0 <= self.top_k < 2**31:
            raise ProtocolError(ErrorCode.BAD_SAMPLING, f"top_k {self.top_k} is outside [0, 2**31)")
        if not 0 <= self.seed < 2**63:
            raise ProtocolError(ErrorCode.BAD_SAMPLING, f"seed {self.seed} is outside [0, 2**63)")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below ``GREEDY_BELOW_TEMPERATURE``): the target's argmax, no random numbers."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class Draft:
    """One round of one session: k draft tokens proposed after the committed prefix of length base_len.

    ``context`` is the full committed history x[0:base_len]; an edge sends it when it opens a session
    or answers a resync, and omits it otherwise.
    """

    device_id: str  # wire key "device"
    session_id: str  # wire key "session"
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
    """The verifier's answer to one Draft (or to a message it could not read, with whatever session and seq it
    could read from it, else None)."""

    kind: VerdictKind
    verifier_id: str  # wire key "verifier"
    session_id: str | None  # wire key "session"
    seq: int | None
    accepted: int = 0
    next_token: int | None = None
    next_kind: NextKind | None = None
    committed_len: int = 0
    finish: FinishReason | None = None
    error: ErrorCode | None = None
    reason: str | None = None
    # On a VERIFIED verdict: the identity of the target that computed it (Status.target), which the edge checks
    # against the one its session is pinned to. None: a verifier that announces none (optional both ways).
    target: str | None = None


@dataclass(frozen=True)
class Status:
    """A verifier's retained status; its MQTT last will is the same with online False."""

    verifier_id: str  # wire key "verifier"
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
    # The server's price (issue 22): its fitted step cost now, (seconds a step costs whatever it holds, seconds
    # per draft, seconds per scored token, drafts per step recently); edges choose k against it. None: not announced.
    step_cost: tuple[float, float, float, float] | None = None
    # Sessions it can still open without evicting any (its KV memory budget and session table allow);
    # None: a peer that does not say.
    free_sessions: int | None = None


@dataclass(frozen=True)
class Close:
    """An edge ending a session the verifier still holds (a stop sequence, a cancelled request, an error):
    the verifier frees its state at once instead of waiting for LRU eviction. No answer is sent."""

    device_id: str  # wire key "device"
    session_id: str  # wire key "session"


Message = Draft | Verdict | Status | Close
