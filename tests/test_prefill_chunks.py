"""Prefill chunks depend only on the session (issue 21, item 3), with the real engine on both runtimes.

CPU attention is not bitwise independent of how a context's queries are split, so where a session's prefill is cut
must not depend on who else prefills in the same steps. The engine cuts every context at multiples of
``prefill_chunk`` of its own positions and a session whose next whole chunk does not fit a step waits: its
next-round logits are then ``torch.equal`` whether it prefilled alone or beside others of any length, on the same
device or another, started before it or with it. (Before, the per-step budget was shared oldest first and 25 of 67
split points changed the logits.)
"""

from __future__ import annotations

import random

import pytest
import torch

from sled_protocol import Draft
from sled_verifier.engine import OutcomeKind, Quotas, VerifierEngine
from sled_verifier.runtime import RUNTIMES, load_target
from sled_verifier.stats import VerifierStats

CHUNK = 64
QUOTAS = Quotas(prefill_chunk=CHUNK, max_prefill=4 * CHUNK, device_prefill=2 * CHUNK)


class Recording:
    """The target, recording the logits of every verification forward by slot."""

    def __init__(self, target) -> None:
        self.target, self.logits, self.calls = target, {}, []  # calls: (slots, logits) of each verification forward
        self.forwards = 0

    def __getattr__(self, name):
        return getattr(self.target, name)

    def forward_rows(self, slots, starts, inputs, logits: bool = True, logit_rows: int | None = None,
                     packed_logits: bool = False):  # recorded padded: the engine takes either
        self.forwards += 1
        out = self.target.forward_rows(slots, starts, inputs, logits=logits, **(
            {} if logit_rows is None else {"logit_rows": logit_rows}))
        if logits:
            for row, (slot, tokens) in enumerate(zip(slots, inputs)):
                if row < (len(inputs) if logit_rows is None else logit_rows):
                    self.logits[slot] = out[row, : len(tokens)].clone()
            self.calls.append((list(slots[: len(out)]), out.clone()))
        return out


@pytest.fixture(scope="module", params=RUNTIMES)
def target(tiny_models, request):
    return load_target(tiny_models.target, request.param, device="cpu")


def first_round(device: str, session: str, length: int, seed: int) -> Draft:
    rng = random.Random(seed)
    context = tuple(rng.randrange(3, 500) for _ in range(length))
    return Draft(device, session, 0, base_len=length, tokens=tuple(rng.randrange(3, 500) for _ in range(4)),
                 max_len=length + 50, vocab="v", context=context)


def logits_of(target, subject: Draft, early: list[Draft], beside: list[Draft]) -> torch.Tensor:
    """``subject``'s round logits on a fresh engine: ``early`` drafts step once before it joins, then it steps
    with ``early`` and ``beside`` until it is verified."""
    recording = Recording(target)
    engine = VerifierEngine(recording, "v", max_sessions=16, stats=VerifierStats(), max_context=512, quotas=QUOTAS)
    if early:
        engine.step(early)
    batch = [*early, *beside, subject]
    for _ in range(100):
        outcome = {id(o.draft): o for o in engine.step(batch)}[id(subject)]
        if outcome.kind is OutcomeKind.VERIFIED:
            return recording.logits[engine.sessions.get(subject.device_id, subject.session_id).slot]
        assert outcome.kind is OutcomeKind.DEFERRED
        batch = [d for d in batch if engine.sessions.get(d.device_id, d.session_id) is None
                 or not engine.sessions.get(d.device_id, d.session_id).rounds]  # verified neighbours leave the step
    raise AssertionError("the subject never finished its prefill")


NEIGHBOURS = {  # (device, length, joins a step early)
    "one longer": [("n", 235, False)],
    "short and long": [("n", 17, False), ("m", 300, False)],
    "same device": [("s", 90, False), ("s", 150, False)],
    "started earlier": [("n", 235, True), ("m", 40, True)],
    "many": [(f"d{i}", 5 + 37 * i, i % 2 == 0) for i in range(7)],
}


@pytest.mark.parametrize("length", [200, 129, 64, 7])
def test_a_sessions_logits_do_not_depend_on_its_prefill_neighbours(target, length):
    subject = first_round("s", "subject", length, seed=length)
    alone = logits_of(target, subject, [], [])
    for case, neighbours in NEIGHBOURS.items():
        drafts = [(first_round(device, f"n{i}", size, seed=1000 + i), early)
                  for i, (device, size, early) in enumerate(neighbours)]
        together = logits_of(target, subject, [d for d, e in drafts if e], [d for d, e in drafts if not e])
        assert torch.equal(alone, together), (case, (alone - together).abs().max().item())


def test_a_rebuild_replays_the_same_chunks(target):
    """A resync rebuilds the session from its context in the same chunks: the same bits as the first time."""
    subject = first_round("s", "subject", 200, seed=3)
    first = logits_of(target, subject, [], [first_round("n", "x", 100, seed=4)])
    recording = Recording(target)
    engine = VerifierEngine(recording, "v", max_sessions=4, stats=VerifierStats(), max_context=512, quotas=QUOTAS)
    engine.step_until_answered([first_round("m", "y", 77, seed=5), subject])
    engine.close("s", "subject")
    [outcome] = engine.step_until_answered([subject])  # the edge resends its context
    assert outcome.kind is OutcomeKind.VERIFIED
    assert torch.equal(first, recording.logits[engine.sessions.get("s", "subject").slot])


def test_a_chunk_that_does_not_fit_waits_rather_than_taking_a_leftover(target):
    engine = VerifierEngine(target, "v", max_sessions=4, stats=VerifierStats(), max_context=512,
                            quotas=Quotas(prefill_chunk=CHUNK, max_prefill=CHUNK + 10, device_prefill=CHUNK + 10))
    a, b = first_round("a", "a", 300, seed=1), first_round("b", "b", 300, seed=2)
    engine.step([a, b])
    cached = {d.device_id: engine.sessions.get(d.device_id, d.session_id).cached for d in (a, b)}
    assert cached == {"a": CHUNK, "b": 0}  # b's next chunk did not fit the 10 tokens left: it waited



class Apart(Recording):
    """The target with its prefill chunks in forwards of their own, as a runtime that pads rows runs them."""

    packs_rows = False


def test_chunks_in_the_verification_forward_change_no_bit(target):
    """Where the runtime packs rows, a step's prefill chunks ride in its verification forward (one forward, not
    two): every verified row's logits, every verdict and every cache are the same bits as with the chunks apart."""
    def run(recording):
        engine = VerifierEngine(recording, "v", max_sessions=16, stats=VerifierStats(), max_context=512,
                                quotas=QUOTAS)
        rng, verdicts, logged = random.Random(9), [], []
        opened = [first_round(f"d{i % 3}", f"s{i}", length, seed=i) for i, length in enumerate((7, 64, 129, 200))]
        verdicts += [o.verdict for o in engine.step_until_answered(opened)]
        for round_ in range(1, 4):  # later rounds of the open sessions beside new sessions' prefill
            later = []
            for draft in opened:
                state = engine.sessions.get(draft.device_id, draft.session_id)
                if not state.finished:
                    later.append(Draft(draft.device_id, draft.session_id, round_, base_len=len(state.committed),
                                       tokens=tuple(rng.randrange(3, 500) for _ in range(round_)),
                                       max_len=draft.max_len, vocab="v"))
            fresh = [first_round("d9", f"new{round_}", 40 + 70 * round_, seed=100 + round_)]
            verdicts += [o.verdict for o in engine.step_until_answered(later + fresh)]
            opened += fresh
        for draft in opened:
            state = engine.sessions.get(draft.device_id, draft.session_id)
            logged.append(tuple(state.committed))
        return verdicts, logged, recording.calls, engine.stats, recording.forwards

    together, apart = run(Recording(target)), run(Apart(target))
    if getattr(target, "packs_rows", False):
        assert together[4] < apart[4]  # the chunks did ride along
    assert together[0] == apart[0] and together[1] == apart[1]
    assert len(together[2]) == len(apart[2])
    for (slots_a, logits_a), (slots_b, logits_b) in zip(together[2], apart[2]):
        assert slots_a == slots_b and torch.equal(logits_a, logits_b)
    assert together[3].prefill_tokens == apart[3].prefill_tokens
