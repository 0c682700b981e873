"""Wire format: golden bytes, round trips, and one ProtocolError for every kind of bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from sled_protocol import (
    Draft, ErrorCode, Limits, NextKind, ProtocolError, SamplingParams, Status, Verdict, VerdictKind, FinishReason,
    decode, decode_draft, decode_status, decode_verdict, encode,
)
from sled_protocol import topics

DRAFT = Draft(device_id="jetson-1", session_id="s1", seq=3, base_len=5, tokens=(10, 11, 12), max_len=40,
              vocab="0123456789abcdef")
VERDICT = Verdict(kind=VerdictKind.VERIFIED, verifier_id="v1", session_id="s1", seq=3, accepted=2, next_token=7,
                  next_kind=NextKind.RECOVERED, committed_len=8)
STATUS = Status(verifier_id="v1", online=True, model="target", vocab="0123456789abcdef", vocab_size=512, load=2,
                capacity=256, max_draft_tokens=16, max_context_tokens=4096)
STATUS_WITH_TARGET = Status(**{**STATUS.__dict__, "target": "fedcba9876543210"})
VERDICT_WITH_TARGET = Verdict(**{**VERDICT.__dict__, "target": "fedcba9876543210"})

# Golden bytes: a change here is a wire-format change and needs a new SCHEMA_VERSION. An optional field
# that older decoders ignore (Status.target, Verdict.target) only adds an entry: the existing bytes stay as they were.
GOLDEN = {
    "draft": (DRAFT, "89a174a56472616674a17601a6646576696365a86a6574736f6e2d31a773657373696f6ea27331a373657103a862"
                     "6173655f6c656e05a6746f6b656e73930a0b0ca76d61785f6c656e28a5766f636162b03031323334353637383961"
                     "6263646566"),
    "verdict": (VERDICT, "8aa174a776657264696374a17601a46b696e64a87665726966696564a87665726966696572a27631a7736573"
                         "73696f6ea27331a373657103a8616363657074656402aa6e6578745f746f6b656e07a96e6578745f6b696e64"
                         "a97265636f7665726564ad636f6d6d69747465645f6c656e08"),
    "verdict_with_target": (VERDICT_WITH_TARGET,
                            "8ba174a776657264696374a17601a46b696e64a87665726966696564a87665726966696572a27631a77365"
                            "7373696f6ea27331a373657103a8616363657074656402aa6e6578745f746f6b656e07a96e6578745f6b69"
                            "6e64a97265636f7665726564ad636f6d6d69747465645f6c656e08a6746172676574b06665646362613938"
                            "3736353433323130"),
    "status": (STATUS, "8ba174a6737461747573a17601a87665726966696572a27631a66f6e6c696e65c3a56d6f64656ca6746172676574"
                       "a5766f636162b030313233343536373839616263646566aa766f6361625f73697a65cd0200a46c6f616402a8"
                       "6361706163697479cd0100b06d61785f64726166745f746f6b656e7310b26d61785f636f6e746578745f746f"
                       "6b656e73cd1000"),
    "status_with_target": (STATUS_WITH_TARGET,
                           "8ca174a6737461747573a17601a87665726966696572a27631a66f6e6c696e65c3a56d6f64656ca674617267"
                           "6574a5766f636162b030313233343536373839616263646566aa766f6361625f73697a65cd0200a46c6f6164"
                           "02a86361706163697479cd0100b06d61785f64726166745f746f6b656e7310b26d61785f636f6e746578745f"
                           "746f6b656e73cd1000a6746172676574b066656463626139383736353433323130"),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_bytes(name):
    message, golden = GOLDEN[name]
    assert encode(message).hex() == golden
    assert decode(bytes.fromhex(golden)) == message


def test_round_trips_with_optional_fields():
    draft = Draft(device_id="pi5", session_id="a", seq=0, base_len=3, tokens=(), max_len=4, vocab="v",
                  context=(1, 2, 3))
    assert decode_draft(encode(draft)) == draft
    for verdict in (
        Verdict(kind=VerdictKind.RESYNC, verifier_id="v", session_id="a", seq=0, reason="no state"),
        Verdict(kind=VerdictKind.ERROR, verifier_id="v", session_id=None, seq=None, error=ErrorCode.MALFORMED,
                reason="x"),
        Verdict(kind=VerdictKind.VERIFIED, verifier_id="v", session_id="a", seq=9, accepted=4, next_token=None,
                committed_len=20, finish=FinishReason.EOS),
    ):
        assert decode_verdict(encode(verdict)) == verdict
    assert decode_status(encode(Status(verifier_id="v", online=False))) == Status(verifier_id="v", online=False)


def test_status_target_is_optional_both_ways():
    # An older verifier announces no target identity; an older edge skips the field as unknown.
    assert decode_status(encode(STATUS)).target is None
    body = msgpack.unpackb(encode(STATUS_WITH_TARGET))
    assert body["target"] == "fedcba9876543210"
    with pytest.raises(ProtocolError):
        decode_status(msgpack.packb({**body, "target": 7}))


def test_unknown_fields_are_ignored():
    body = msgpack.unpackb(encode(DRAFT))
    body["future_field"] = {"anything": [1, 2]}
    assert decode_draft(msgpack.packb(body)) == DRAFT


def _mutated(**changes) -> bytes:
    body = msgpack.unpackb(encode(DRAFT))
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return msgpack.packb(body)


BAD_DRAFTS = [
    ("not msgpack", b"\xc1\xc1\xc1", ErrorCode.MALFORMED),
    ("truncated", encode(DRAFT)[:-5], ErrorCode.MALFORMED),
    ("a list, not a map", msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),
    ("missing version", _mutated(v=...), ErrorCode.MALFORMED),
    ("future version", _mutated(v=99), ErrorCode.MALFORMED),
    ("a verdict on the drafts topic", encode(VERDICT), ErrorCode.MALFORMED),
    ("missing session", _mutated(session=...), ErrorCode.MALFORMED),
    ("missing tokens", _mutated(tokens=...), ErrorCode.MALFORMED),
    ("seq as string", _mutated(seq="3"), ErrorCode.MALFORMED),
    ("seq as bool", _mutated(seq=True), ErrorCode.MALFORMED),
    ("negative seq", _mutated(seq=-1), ErrorCode.MALFORMED),
    ("base_len 0", _mutated(base_len=0), ErrorCode.MALFORMED),
    ("float token", _mutated(tokens=[1.5]), ErrorCode.MALFORMED),
    ("token beyond vocabulary", _mutated(tokens=[1, 512]), ErrorCode.BAD_TOKEN),
    ("negative token", _mutated(tokens=[-3]), ErrorCode.BAD_TOKEN),
    ("draft too long", _mutated(tokens=list(range(17))), ErrorCode.TOO_LARGE),
    ("context too long", _mutated(base_len=5000), ErrorCode.TOO_LARGE),
    ("max_len before base_len", _mutated(max_len=5), ErrorCode.MALFORMED),
    ("max_len past the context limit", _mutated(max_len=4097), ErrorCode.TOO_LARGE),
    ("draft runs past max_len", _mutated(max_len=7), ErrorCode.MALFORMED),
    ("context length differs", _mutated(context=[1, 2]), ErrorCode.MALFORMED),
    ("empty device", _mutated(device=""), ErrorCode.MALFORMED),
    ("oversized message", msgpack.packb({"t": "draft", "v": 1, "pad": "x" * 70_000}), ErrorCode.TOO_LARGE),
]


@pytest.mark.parametrize(("case", "data", "code"), BAD_DRAFTS, ids=[case for case, _, _ in BAD_DRAFTS])
def test_bad_drafts_raise_one_error_type(case, data, code):
    limits = Limits(max_message_bytes=65_536, max_draft_tokens=16, max_context_tokens=4096, vocab_size=512)
    with pytest.raises(ProtocolError) as raised:
        decode_draft(data, limits)
    assert raised.value.code is code, str(raised.value)


def test_refusal_names_the_session_when_it_can():
    with pytest.raises(ProtocolError) as raised:
        decode_draft(_mutated(tokens=[1, 99999]), Limits(vocab_size=512))
    assert (raised.value.session_id, raised.value.seq) == ("s1", 3)


def test_close_round_trip():
    from sled_protocol import Close
    from sled_protocol.codec import decode_inbound

    close = Close(device_id="pi5", session_id="s1")
    assert decode(encode(close)) == close and decode_inbound(encode(close)) == close


def test_topics():
    assert topics.draft_topic("v1", "pi-5") == "sled/v1/drafts/v1/pi-5"
    assert topics.device_of_draft_topic("sled/v1/drafts/v1/pi-5") == "pi-5"
    assert topics.device_of_draft_topic("sled/v1/verdicts/pi-5") is None
    assert topics.verdict_topic("pi-5") == "sled/v1/verdicts/pi-5"
    for bad in ("", "a/b", "+", "#", " x", "x" * 65):
        with pytest.raises(ValueError):
            topics.verdict_topic(bad)


SAMPLED = Draft(device_id="pi5", session_id="s", seq=1, base_len=3, tokens=(4, 9), max_len=20, vocab="v",
                sampling=SamplingParams(0.8, 20, 0.95, 1234),
                q_ids=((4, 5, 6), (9, 1)), q_probs=((0.5, 0.25, 0.25), (0.75, 0.25)))


def _sampled(**changes) -> bytes:
    body = msgpack.unpackb(encode(SAMPLED))
    body.update(changes)
    return msgpack.packb(body)


def test_sampled_draft_round_trip_in_float32():
    decoded = decode_draft(encode(SAMPLED))
    assert decoded == SAMPLED
    assert decoded.sampling.temperature == np.float32(0.8) and decoded.sampling.top_p == np.float32(0.95)


BAD_PROPOSALS = [
    ("negative probability", _sampled(q_probs=[[1.25, -0.25, 0.0], [0.75, 0.25]]), ErrorCode.BAD_PROPOSAL),
    ("NaN probability", _sampled(q_probs=[[float("nan"), 0.5, 0.5], [0.75, 0.25]]), ErrorCode.BAD_PROPOSAL),
    ("does not sum to 1", _sampled(q_probs=[[0.5, 0.2, 0.2], [0.75, 0.25]]), ErrorCode.BAD_PROPOSAL),
    ("id outside the vocabulary", _sampled(q_ids=[[4, 5, 600], [9, 1]]), ErrorCode.BAD_TOKEN),
    ("m too large", _sampled(q_ids=[list(range(65)), [9, 1]], q_probs=[[1 / 65] * 65, [0.75, 0.25]]), ErrorCode.TOO_LARGE),
    ("repeated id", _sampled(q_ids=[[4, 4, 6], [9, 1]]), ErrorCode.BAD_PROPOSAL),
    ("one row per draft token", _sampled(q_ids=[[4, 5, 6]], q_probs=[[0.5, 0.25, 0.25]]), ErrorCode.BAD_PROPOSAL),
    ("ragged row", _sampled(q_ids=[[4, 5], [9, 1]]), ErrorCode.BAD_PROPOSAL),
    ("proposal without sampling", _sampled(sampling=None), ErrorCode.BAD_PROPOSAL),
    ("negative temperature", _sampled(sampling={"temperature": -1.0}), ErrorCode.BAD_SAMPLING),
    ("top_p zero", _sampled(sampling={"temperature": 1.0, "top_p": 0.0}), ErrorCode.BAD_SAMPLING),
    ("seed as string", _sampled(sampling={"temperature": 1.0, "seed": "42"}), ErrorCode.BAD_SAMPLING),
]


@pytest.mark.parametrize(("case", "data", "code"), BAD_PROPOSALS, ids=[case for case, _, _ in BAD_PROPOSALS])
def test_bad_proposals_are_refused(case, data, code):
    with pytest.raises(ProtocolError) as raised:
        decode_draft(data, Limits(vocab_size=512))
    assert raised.value.code is code, str(raised.value)
    assert raised.value.session_id == "s"


BAD_SAMPLING = [
    ("negative temperature", dict(temperature=-0.5)),
    ("temperature above the maximum", dict(temperature=100.5)),
    ("infinite temperature", dict(temperature=float("inf"))),
    ("NaN temperature", dict(temperature=float("nan"))),
    ("temperature as bool", dict(temperature=True)),
    ("top_p zero", dict(top_p=0.0)),
    ("top_p above 1", dict(top_p=1.5)),
    ("negative top_k", dict(top_k=-1)),
    ("top_k as float", dict(top_k=2.0)),
    ("seed too large", dict(seed=2**63)),
    ("negative seed", dict(seed=-1)),
]


@pytest.mark.parametrize("fields", [f for _, f in BAD_SAMPLING], ids=[case for case, _ in BAD_SAMPLING])
def test_sampling_params_check_their_own_ranges_for_every_caller(fields):
    """One place for the ranges: a command line, an HTTP request and the wire all meet the same check."""
    with pytest.raises(ProtocolError) as raised:
        SamplingParams(**fields)
    assert raised.value.code is ErrorCode.BAD_SAMPLING
    body = msgpack.unpackb(_sampled(sampling={"temperature": 1.0, **fields}))  # the same values off the wire
    with pytest.raises(ProtocolError) as raised:
        decode_draft(msgpack.packb(body), Limits(vocab_size=512))
    assert raised.value.code is ErrorCode.BAD_SAMPLING and raised.value.session_id == "s"


def test_sampling_params_at_the_edges_of_their_ranges_are_accepted():
    assert SamplingParams(0.0).greedy and SamplingParams(100.0).temperature == 100.0
    assert SamplingParams(1.0, top_k=2**31 - 1, top_p=1.0, seed=2**63 - 1).seed == 2**63 - 1
    assert not SamplingParams(1e-3).greedy


def test_status_step_cost_is_optional_both_ways_and_checked():
    # The server's price (issue 22): four non-negative numbers; an older verifier announces none (None), an
    # older edge skips the field as unknown; anything else is a malformed status.
    assert decode_status(encode(STATUS)).step_cost is None
    priced = Status(verifier_id="v", online=True, step_cost=(0.125, 0.0, 0.001953125, 12.0))  # float32-exact
    assert decode_status(encode(priced)) == priced
    body = msgpack.unpackb(encode(priced))
    for bad in ([0.1, 0.0, 0.002], [0.1, -0.5, 0.002, 1.0], [0.1, 0.0, float("nan"), 1.0], [True, 0, 0, 1], "0.1"):
        with pytest.raises(ProtocolError):
            decode_status(msgpack.packb({**body, "step_cost": bad}))


def test_acceptance_counts_are_vllms():
    """One type counts acceptance on the edge, the verifier and in sled-inspect, under vLLM's definitions."""
    from sled_protocol.acceptance import AcceptanceCounts

    counts = AcceptanceCounts()
    for k, accepted in ((3, 2), (1, 0), (0, 0)):
        counts.record(k, accepted)
    assert counts.spec_decode() == {
        "num_drafts": 3, "num_draft_tokens": 4, "num_accepted_tokens": 2, "num_accepted_tokens_per_pos": [1, 1, 0],
        "mean_acceptance_length": round(1 + 2 / 3, 4), "draft_acceptance_rate": 0.5}


def test_python_names_travel_under_the_wire_keys():
    """device_id, session_id and verifier_id are the records' Python names; the wire keeps device, session and
    verifier (codec.WIRE_KEYS), so no peer sees a change and the schema version stays."""
    from sled_protocol import SCHEMA_VERSION, Close

    assert encode(Close(device_id="pi5", session_id="s1")) == msgpack.packb(
        {"t": "close", "v": SCHEMA_VERSION, "device": "pi5", "session": "s1"})
    for message in (DRAFT, VERDICT, STATUS):
        keys = set(msgpack.unpackb(encode(message)))
        assert not {"device_id", "session_id", "verifier_id"} & keys
        assert decode(encode(message)) == message
