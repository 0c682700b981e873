"""Hypothesis strategies for hostile SLED messages: every message type and every field, with numeric extremes (huge
and subnormal floats, -0.0, NaN, inf, ints at 2**63 and up to msgpack's 2**64 - 1, bools where numbers go), wrong
types, deep nesting, long arrays and wide maps, truncations and raw bytes.

``payloads(device, vocab)`` draws one message's bytes, built from a valid message of some type for ``device`` with
1-3 fields replaced, removed or added, or from no message at all. ``SLED_FUZZ_EXAMPLES`` sets how many a run draws.
"""

from __future__ import annotations

import os

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("SLED_FUZZ_EXAMPLES", "0"))  # 0: the bounded run of `make test`
LONG_RUN = EXAMPLES > 0


def fuzz_settings(bounded: int) -> settings:
    """``bounded`` examples in the test suite (reproducible), ``SLED_FUZZ_EXAMPLES`` random ones in a long run."""
    return settings(max_examples=EXAMPLES or bounded, deadline=None, derandomize=not LONG_RUN, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])


EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31)]
EDGE_FLOATS = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.1754943508222875e-38, 1e-45, 1e-4, 0.9999999, 1.0,
               1.0000001, 100.0, 100.00001, 3.4028235e38, 1.7e308, 1.7976931348623157e308, float("inf"),
               float("-inf"), float("nan")]

integers = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_INTS))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                   st.floats(width=32, allow_subnormal=True), st.sampled_from(EDGE_FLOATS))
numbers = st.one_of(integers, floats, st.booleans())
# What a probability, a temperature or a count must never be: finite but huge, tiny, negative, not a number.
extremes = st.one_of(st.floats(min_value=1e300, allow_infinity=False), st.floats(max_value=-1e-300),
                     st.floats(min_value=0, max_value=1e-300), st.sampled_from(EDGE_FLOATS), numbers)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "draft", "close", "\0", "/"]),
                  st.integers(0, 9000).map(lambda n: "x" * n))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts, st.binary(max_size=64))
nested = st.recursive(scalars, lambda children: st.lists(children, max_size=6)
                      | st.dictionaries(st.text(max_size=8), children, max_size=6), max_leaves=30)
long_arrays = st.builds(lambda n, item: [item] * n, st.integers(0, 6000), st.one_of(scalars, st.just([])))
wide_maps = st.builds(lambda n, item: {f"k{i}": item for i in range(n)}, st.integers(0, 200), scalars)
deep = st.builds(lambda depth, leaf: _nest(depth, leaf), st.integers(1, 400), scalars)
values = st.one_of(scalars, scalars, numbers, nested, long_arrays, wide_maps, deep)


def _nest(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def templates(device: str, vocab: str, inbound: bool = False) -> list[dict]:
    """One valid message body of each kind (two drafts: greedy with context, sampled with a proposal); ``inbound``:
    what a verifier receives, mostly drafts (the other kinds once)."""
    draft = {"t": "draft", "v": 1, "device": device, "session": "s", "seq": 0, "base_len": 3, "tokens": [4, 5],
             "max_len": 40, "vocab": vocab, "context": [1, 2, 3]}
    sampled = {**draft, "seq": 1, "sampling": {"temperature": 0.8, "top_k": 20, "top_p": 0.95, "seed": 7},
               "q_ids": [[4, 9], [5]], "q_probs": [[0.75, 0.25], [1.0]]}
    close = {"t": "close", "v": 1, "device": device, "session": "s"}
    if inbound:
        return [draft, sampled, draft, sampled, {**sampled, "context": None, "base_len": 30}, close]
    return [
        draft, sampled, close,
        {"t": "verdict", "v": 1, "kind": "verified", "verifier": "v", "session": "s", "seq": 3, "accepted": 2,
         "next_token": 7, "next_kind": "bonus", "committed_len": 8, "target": "t"},
        {"t": "verdict", "v": 1, "kind": "error", "verifier": "v", "error": "too_large", "reason": "x"},
        {"t": "status", "v": 1, "verifier": "v", "online": True, "model": "m", "vocab": vocab, "vocab_size": 512,
         "load": 1, "capacity": 4, "max_draft_tokens": 16, "max_context_tokens": 4096, "target": "t",
         "step_cost": [0.01, 0.001, 0.0001, 4.0]},
    ]


@st.composite
def _mutated(draw, device: str, vocab: str, inbound: bool) -> bytes:
    body = draw(st.sampled_from(templates(device, vocab, inbound)))
    body = {key: (dict(value) if isinstance(value, dict) else value) for key, value in body.items()}
    if "q_probs" in body and draw(st.integers(0, 3)) == 0:  # a proposal row of the right length, extreme values
        width = len(body["q_ids"][0])
        body["q_probs"] = [draw(st.lists(extremes, min_size=width, max_size=width)), *body["q_probs"][1:]]
        return msgpack.packb(body, use_bin_type=True)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        where = draw(st.sampled_from([*body, "sampling", "q_probs", "tokens", "new"]))
        action = draw(st.sampled_from(["set", "set", "set", "element", "element", "row", "delete"]))
        if action == "delete":
            body.pop(where, None)
        elif action == "row" and isinstance(body.get(where), list) and body[where]:  # a whole row of numbers
            index = draw(st.integers(0, len(body[where]) - 1))
            row = draw(st.lists(extremes, min_size=1, max_size=4))
            body[where] = [*body[where][:index], row, *body[where][index + 1:]]
        elif action == "element" and isinstance(body.get(where), list) and body[where]:
            index = draw(st.integers(0, len(body[where]) - 1))
            row = body[where][index]
            if isinstance(row, list) and row:  # a proposal row: one id or probability
                row = list(row)
                row[draw(st.integers(0, len(row) - 1))] = draw(numbers)
                body[where] = [*body[where][:index], row, *body[where][index + 1:]]
            else:
                body[where] = [*body[where][:index], draw(numbers), *body[where][index + 1:]]
        elif action == "element" and isinstance(body.get(where), dict):  # sampling: one of its fields
            body[where][draw(st.sampled_from(["temperature", "top_k", "top_p", "seed", "new"]))] = draw(values)
        else:
            body[where if where != "new" else draw(st.text(max_size=8))] = draw(values)
    try:
        return msgpack.packb(body, use_bin_type=True, use_single_float=draw(st.booleans()))
    except OverflowError:  # a float64 beyond float32's range
        return msgpack.packb(body, use_bin_type=True)


@st.composite
def _framed(draw, device: str, vocab: str, inbound: bool) -> bytes:
    """A valid message's bytes cut short, with bytes after it, or with its tokens nested deeper than msgpack allows."""
    packed = msgpack.packb(draw(st.sampled_from(templates(device, vocab, inbound))), use_bin_type=True)
    how = draw(st.sampled_from(["truncated", "trailing", "deep"]))
    if how == "truncated":
        return packed[:draw(st.integers(0, len(packed) - 1))]
    if how == "trailing":
        return packed + draw(st.binary(min_size=1, max_size=16))
    header = b"\x83\xa1t\xa5draft\xa1v\x01\xa6tokens"  # {"t": "draft", "v": 1, "tokens": [[[...]]]}
    return header + b"\x91" * draw(st.integers(1, 100_000)) + b"\xc0"


def payloads(device: str, vocab: str, inbound: bool = False) -> st.SearchStrategy[bytes]:
    """Mostly a valid message with 1-3 fields changed; else a framing fault, raw bytes or any msgpack value."""
    kinds = [_mutated(device, vocab, inbound)] * 7 + [
        _framed(device, vocab, inbound), st.binary(max_size=512),
        st.builds(lambda value: msgpack.packb(value, use_bin_type=True), values)]
    return st.integers(0, len(kinds) - 1).flatmap(lambda index: kinds[index])
