"""The compiled runtime never fails on a new shape: a bounded set of buckets is compiled, the rest runs eagerly.

Its static forward is compiled with ``fullgraph=True, dynamic=False``, so every bucket (rows, tokens, width,
prefill or not, KV size) is one graph, and past dynamo's recompile limit a fullgraph function raises on each new
shape (issue 21: a synthetic fleet meets 335 shapes in ~7,000 steps, then every session fails with
``resync_loop``). Here dynamo's limit is set to one graph, far below the shapes a few ragged sessions meet.
"""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer

from conftest import PROMPTS
from sled_edge.session import EdgeSession
from sled_protocol import VerdictKind
from sled_protocol.vocab import vocab_hash
from sled_verifier.compiled import CompiledTarget, ShapeBudget, static_shape
from sled_verifier.engine import Quotas, VerifierEngine
from sled_verifier.stats import VerifierStats


def test_a_budget_compiles_its_first_shapes_then_runs_the_rest_eagerly():
    budget = ShapeBudget(2)
    assert [budget.admit(s) for s in ("a", "b", "c", "a", "b", "d")] == [True, True, False, True, True, False]
    assert budget.compiled == {"a", "b"} and budget.eager_steps == 2
    budget.refused("b")  # dynamo would not compile b after all: nothing more is compiled
    assert not budget.admit("e") and budget.admit("a") and budget.compiled == {"a"} and budget.eager_steps == 4


def drive(engine, sessions, prompt_lens, continuations, rng) -> int:
    """Every live session sends one round per step: k in 0..9 tokens of the target's own continuation, one of
    them sometimes wrong, so rows, tokens per row and widths vary from step to step. Returns the verdicts."""
    verdicts = 0
    while live := [i for i, s in enumerate(sessions) if s.finish is None]:
        live = rng.sample(live, rng.randrange(1, len(live) + 1))
        drafts = []
        for i in live:
            done = len(sessions[i].committed) - prompt_lens[i]
            tokens = continuations[i][done : done + min(rng.randrange(10), sessions[i].budget - 1)]
            if tokens and rng.random() < 0.3:
                tokens[rng.randrange(len(tokens))] = 3  # a wrong guess: rejected, the target's token recovered
            drafts.append(sessions[i].draft(tokens))
        for i, draft, outcome in zip(live, drafts, engine.step_until_answered(drafts)):
            assert outcome.verdict.kind is VerdictKind.VERIFIED, outcome.verdict
            sessions[i].apply(draft, outcome.verdict)
            verdicts += 1
    return verdicts


# Inductor compiles in this process: torch's own deprecations inside it are not this project's to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
def test_more_shapes_than_dynamo_allows_and_every_verdict_comes_back(tiny_models, reference, monkeypatch):
    """``--compile default`` on CPU (inductor), dynamo allowed one graph of the forward: the first bucket is
    compiled, dynamo refuses the second, and every later bucket runs eagerly; every round gets its verdict and
    every session the target's own greedy continuation. Without the budget the second shape raises."""
    target = CompiledTarget(tiny_models.target, "cpu", compile="default", max_compiled_shapes=8)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    seen = set()
    prepare = target.prepare

    def spy(*args, **kwargs):  # records each step's bucket; the forward itself is untouched
        prepared = prepare(*args, **kwargs)
        seen.add(static_shape(prepared[0], target.kv))
        return prepared

    monkeypatch.setattr(target, "prepare", spy)
    engine = VerifierEngine(target, "v", max_sessions=6, stats=VerifierStats(),
                            quotas=Quotas(prefill_chunk=24, max_prefill=24, device_prefill=24))
    tokenizer = Tokenizer.from_file(str(tiny_models.target / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    continuations = [reference(ids, 30) for ids in prompts]
    sessions = [EdgeSession(f"s{i}", "dev", vocab_hash(tiny_models.target), list(ids), len(ids) + 30)
                for i, ids in enumerate(prompts)]
    verdicts = drive(engine, sessions, [len(ids) for ids in prompts], continuations, random.Random(0))
    assert len(seen) > 4 * torch._dynamo.config.recompile_limit, seen   # many more buckets than dynamo allows
    assert len(target.shapes.compiled) == 1 and target.shapes.eager_steps > 0
    assert verdicts >= 4 * 3
    for session, ids, continuation in zip(sessions, prompts, continuations):
        assert session.committed[len(ids):] == continuation
    new_shape = target.prepare([0, 1, 2], [0, 0, 0], [[5] * 40] * 3)[0]  # the control: the bare compiled forward
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        target._compiled(*new_shape)
