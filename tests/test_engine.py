"""The verifier engine with a real tiny torch target and real ONNX drafters, no broker in between."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer

from conftest import PROMPTS
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import Drafter
from sled_edge.session import EdgeSession
from sled_protocol import ErrorCode, FinishReason, VerdictKind
from sled_protocol.vocab import vocab_hash
from sled_verifier.engine import OutcomeKind, Quotas, VerifierEngine
from sled_verifier.stats import VerifierStats
from sled_verifier.runtime import RUNTIMES, load_target
from sled_verifier.target import TransformersTarget


@pytest.fixture(scope="module", params=RUNTIMES)
def target(tiny_models, request):
    """Every engine test runs on both runtimes: the transformers reference and the compiled forward."""
    return load_target(tiny_models.target, request.param, device="cpu")


@pytest.fixture(scope="module")
def drafts(tiny_models):
    return {"self": OnnxDraftModel(tiny_models.target_onnx), "gpt2": OnnxDraftModel(tiny_models.gpt2_onnx)}


def encode(tiny_models, text: str) -> list[int]:
    return Tokenizer.from_file(str(tiny_models.target / "tokenizer.json")).encode(text).ids


def run_lockstep(engine, sessions, drafters, ks):
    """Drive every unfinished session one round per step, all drafts in ONE engine step (one forward)."""
    steps = 0
    while any(s.finish is None for s in sessions):
        live = [i for i, s in enumerate(sessions) if s.finish is None]
        drafts = [sessions[i].draft(drafters[i].propose(sessions[i].committed,
                                                        min(ks[i], sessions[i].budget - 1)).tokens)
                  for i in live]
        outcomes = engine.step_until_answered(drafts)  # prefill longer than one step's budget takes several
        assert [o.kind for o in outcomes] == [OutcomeKind.VERIFIED] * len(live)
        for i, draft, outcome in zip(live, drafts, outcomes):
            sessions[i].apply(draft, outcome.verdict)
            drafters[i].rollback(outcome.verdict.committed_len, draft.base_len, outcome.verdict.accepted)
        steps += 1
    return steps


def test_ragged_batches_are_lossless(tiny_models, target, drafts, reference):
    """Sessions of different context length, draft model and k share each forward and match the target alone."""
    engine = VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats())
    vocab = vocab_hash(tiny_models.target)
    plan = [("self", 4, 30), ("gpt2", 3, 25), ("self", 1, 12), ("gpt2", 6, 40)]
    sessions, drafters, ks = [], [], []
    for index, ((draft_name, k, max_new), prompt) in enumerate(zip(plan, PROMPTS)):
        ids = encode(tiny_models, prompt)
        sessions.append(EdgeSession(f"s{index}", "dev", vocab, list(ids), len(ids) + max_new))
        drafters.append(Drafter(drafts[draft_name]))
        ks.append(k)
    prompt_lens = [len(s.committed) for s in sessions]
    assert len(set(prompt_lens)) == len(prompt_lens), "prompts must differ in length to make the batch ragged"
    run_lockstep(engine, sessions, drafters, ks)
    for session, prompt_len, (_, _, max_new) in zip(sessions, prompt_lens, plan):
        assert session.committed[prompt_len:] == reference(session.committed[:prompt_len], max_new)
        assert session.finish is FinishReason.LENGTH
    by_draft = {name: [s.stats for s, (n, _, _) in zip(sessions, plan) if n == name] for name in drafts}
    assert all(st.acceptance_rate == 1.0 for st in by_draft["self"])   # the target's own export always agrees
    assert all(st.acceptance_rate < 0.5 for st in by_draft["gpt2"])    # a random small model mostly does not
    assert engine.stats.batches < sum(s.stats.rounds for s in sessions)  # rounds really shared forwards


def test_eos_ends_the_session_like_generate(tiny_models, target, drafts, reference):
    ids = encode(tiny_models, PROMPTS[0])
    free_run = reference(ids, 20)
    eos = free_run[7]  # pretend the 8th greedy token is end-of-sequence
    expected = reference(ids, 20, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) < 20
    engine = VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats())
    original_eos = target.eos_ids
    target.eos_ids = original_eos.new_tensor([eos])
    try:
        for name in ("self", "gpt2"):
            session = EdgeSession(f"eos-{name}", "dev", vocab_hash(tiny_models.target), list(ids), len(ids) + 20)
            run_lockstep(engine, [session], [Drafter(drafts[name])], [5])
            assert session.committed[len(ids):] == expected
            assert session.finish is FinishReason.EOS
    finally:
        target.eos_ids = original_eos


def test_admission_resync_resend_stale_finished_and_eviction(tiny_models, target, drafts):
    engine = VerifierEngine(target, "v", max_sessions=2, stats=VerifierStats())
    vocab = vocab_hash(tiny_models.target)
    ids = encode(tiny_models, PROMPTS[1])
    session = EdgeSession("a", "dev", vocab, list(ids), len(ids) + 6)
    drafter = Drafter(drafts["self"])

    session.send_context = False  # as if the verifier had lost this session
    [outcome] = engine.step([session.draft([])])
    assert outcome.verdict.kind is VerdictKind.RESYNC

    session.send_context = True
    rounds = []
    for _ in range(2):
        draft = session.draft(drafter.propose(session.committed, 1).tokens)
        [result] = engine.step([draft])
        assert result.verdict.kind is VerdictKind.VERIFIED and result.verdict.accepted == 1
        [again] = engine.step([draft])  # a retry of the same round: the same answer, applied once
        assert again.kind is OutcomeKind.RESENT and again.verdict == result.verdict
        session.apply(draft, result.verdict)
        drafter.rollback(result.verdict.committed_len, draft.base_len, result.verdict.accepted)
        rounds.append(draft)
    assert engine.step([rounds[0]])[0].kind is OutcomeKind.STALE  # an older round, late: dropped
    assert engine.step([rounds[0]])[0].verdict is None

    prefilled = engine.stats.prefill_tokens
    session.send_context = True  # context the verifier already holds: verified without a new prefill
    again = session.draft([])
    [same] = engine.step([again])
    assert same.kind is OutcomeKind.VERIFIED and engine.stats.prefill_tokens == prefilled
    session.apply(again, same.verdict)
    session.send_context = False

    behind = replace(session.draft([]), base_len=len(session.committed) - 1)  # diverged history
    assert engine.step([behind])[0].verdict.kind is VerdictKind.RESYNC
    assert engine.sessions.get("dev", "a").committed == session.committed   # and nothing was applied

    assert session.budget == 1
    last = session.draft([])
    [final] = engine.step([last])
    assert final.verdict.finish is FinishReason.LENGTH and final.verdict.next_kind is not None
    session.apply(last, final.verdict)
    [after] = engine.step([replace(last, seq=last.seq + 1, base_len=last.base_len + 1, max_len=last.max_len + 1)])
    assert after.verdict.kind is VerdictKind.ERROR and after.verdict.error is ErrorCode.SESSION_FINISHED

    # Two more sessions evict "a" (max_sessions=2, least recently used first): "a" must resync.
    for name in ("b", "c"):
        other = EdgeSession(name, "dev", vocab, list(ids), len(ids) + 5)
        assert engine.step([other.draft([])])[0].verdict.kind is VerdictKind.VERIFIED
    assert engine.sessions.get("dev", "a") is None and engine.sessions.evictions == 1


def test_sessions_are_per_device(tiny_models, target):
    """Another device using the same session id gets its own session, never this one's state."""
    engine = VerifierEngine(target, "v", max_sessions=4, stats=VerifierStats())
    ids = encode(tiny_models, PROMPTS[0])
    mine = EdgeSession("same", "dev-a", vocab_hash(tiny_models.target), list(ids), len(ids) + 5)
    assert engine.step([mine.draft([])])[0].verdict.kind is VerdictKind.VERIFIED
    theirs = EdgeSession("same", "dev-b", mine.vocab, list(ids), len(ids) + 5)
    theirs.send_context = False
    assert engine.step([theirs.draft([])])[0].verdict.kind is VerdictKind.RESYNC


def test_long_and_short_sessions_share_a_batch_near_the_position_limit(tiny_models, reference):
    """A GPT-2 target (learned positions, 1024 of them): a session near the limit and a short one with a
    long draft share one forward; padding slots must not index past the position table."""
    target = TransformersTarget(tiny_models.gpt2, device="cpu")
    engine = VerifierEngine(target, "v", max_sessions=4, stats=VerifierStats())
    vocab = vocab_hash(tiny_models.gpt2)
    long_prompt = [(7 * i) % 500 + 1 for i in range(1020)]
    alone = {}
    for name, prompt, k in (("long", long_prompt, 1), ("short", long_prompt[:10], 8)):
        session = EdgeSession(name, "solo", vocab, list(prompt), len(prompt) + 2)
        alone[name] = engine.step_until_answered([session.draft([3] * k)])[0].verdict
    sessions = [EdgeSession("long", "dev", vocab, list(long_prompt), 1022),
                EdgeSession("short", "dev", vocab, list(long_prompt[:10]), 12)]
    together = engine.step_until_answered([sessions[0].draft([3]), sessions[1].draft([3] * 8)])
    for outcome, name in zip(together, ("long", "short")):
        assert outcome.verdict.kind is VerdictKind.VERIFIED
        assert (outcome.verdict.accepted, outcome.verdict.next_token) == (alone[name].accepted, alone[name].next_token)


def test_kv_slots_grow_in_count_and_length_without_losing_a_token(tiny_models, target, drafts, reference):
    """More sessions than the first slot allocation, contexts longer than its first length (and a
    prefill in several chunks): the caches grow by copying and every session stays exact."""
    engine = VerifierEngine(target, "v", max_sessions=16, stats=VerifierStats(), quotas=Quotas(prefill_chunk=64))
    vocab = vocab_hash(tiny_models.target)
    rng = __import__("random").Random(5)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(200, 320))] for _ in range(6)]
    sessions = [EdgeSession(f"g{i}", "dev", vocab, list(p), len(p) + 10) for i, p in enumerate(prompts)]
    run_lockstep(engine, sessions, [Drafter(drafts["gpt2" if i % 2 else "self"]) for i in range(6)], [3] * 6)
    for session, prompt in zip(sessions, prompts):
        assert session.committed[len(prompt):] == reference(prompt, 10)
    assert engine.kv.capacity >= 6 and engine.kv.length >= 320
    assert len(engine.kv.free) == engine.kv.capacity  # finished sessions gave their slots back


def test_kv_growth_is_all_or_nothing(target, monkeypatch):
    """An allocation failure while growing leaves the cache as it was, still usable."""
    from sled_verifier.kvslots import SlotKV

    kv = SlotKV(layers=2, heads=2, head_dim=4, dtype=torch.float32, device=target.device, max_slots=8,
                max_length=1024, slots=2, length=8)
    calls = {"n": 0}
    original = kv._empty

    def failing(slots, length, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return original(slots, length, device)

    assert kv.length == 64  # 8 positions asked, rounded up to attention's 64-key span (``key_span``)
    monkeypatch.setattr(kv, "_empty", failing)
    with pytest.raises(MemoryError):
        kv.ensure_length(100)
    assert kv.length == 64 and all(t.shape[2] == 64 for t in kv.keys + kv.values)
    monkeypatch.setattr(kv, "_empty", original)
    kv.ensure_length(100)
    assert kv.length == 128 and all(t.shape[2] == 128 for t in kv.keys + kv.values)


def test_sliding_window_targets_are_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, sliding_window=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding-window"):
        TransformersTarget(tmp_path, device="cpu")


def test_close_frees_the_session_at_once(tiny_models, target):
    engine = VerifierEngine(target, "v", max_sessions=4, stats=VerifierStats())
    ids = encode(tiny_models, PROMPTS[0])
    session = EdgeSession("c", "dev", vocab_hash(tiny_models.target), list(ids), len(ids) + 20)
    draft = session.draft([])
    session.apply(draft, engine.step([draft])[0].verdict)
    free_before = len(engine.kv.free)
    assert engine.close("dev", "c") and not engine.close("dev", "c")
    assert len(engine.kv.free) == free_before + 1 and engine.sessions.get("dev", "c") is None
    assert engine.step([session.draft([])])[0].verdict.kind is VerdictKind.RESYNC


def test_two_drafts_of_one_session_in_one_step_are_refused(tiny_models, target):
    """Each session's rows are scored against its cache as it was before the step: a second draft of the
    same session in that step would be verified against the wrong state, so it is refused, not run."""
    engine = VerifierEngine(target, "v", max_sessions=4, stats=VerifierStats())
    ids = encode(tiny_models, PROMPTS[1])
    session = EdgeSession("twice", "dev", vocab_hash(tiny_models.target), list(ids), len(ids) + 20)
    first = session.draft([5, 6])
    outcomes = engine.step([first, first])
    assert outcomes[0].verdict.kind is VerdictKind.ERROR and outcomes[0].verdict.error is ErrorCode.MALFORMED
    assert outcomes[1].verdict.kind is VerdictKind.VERIFIED and outcomes[1].draft is first


def test_a_greedy_batch_never_touches_sampling_code(tiny_models, target, drafts, reference, monkeypatch):
    """Greedy sessions (no sampling settings, or temperature 0) through the real engine with every sampling
    function made to raise: still exact, so the greedy path never reached them."""
    from sled_protocol import SamplingParams
    from sled_verifier import sampling

    def boom(*args, **kwargs):
        raise AssertionError("a greedy batch reached sampling code")

    for name in ("sampled_rows", "warp_probs", "rejection_sample", "residual_distribution", "sample_inverse_cdf"):
        monkeypatch.setattr(sampling, name, boom)
    engine = VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats())
    vocab = vocab_hash(tiny_models.target)
    prompts = [encode(tiny_models, p) for p in PROMPTS[:3]]
    sessions = [EdgeSession(f"g{i}", "dev", vocab, list(ids), len(ids) + 12) for i, ids in enumerate(prompts)]
    sessions[1].sampling = SamplingParams(0.0, seed=4)  # greedy by temperature: sent without settings
    greedy_by_params = sessions[2]
    for session, drafter_name, k in zip(sessions, ("self", "gpt2", "self"), (3, 2, 4)):
        drafter = Drafter(drafts[drafter_name])
        while session.finish is None:
            draft = session.draft(drafter.propose(session.committed, min(k, session.budget - 1)).tokens)
            if session is greedy_by_params:  # settings sent anyway, temperature 0: still the greedy path
                draft = replace(draft, sampling=SamplingParams(0.0, seed=4))
            [outcome] = engine.step_until_answered([draft])
            session.apply(draft, outcome.verdict)
            drafter.rollback(outcome.verdict.committed_len, draft.base_len, outcome.verdict.accepted)
    for session, ids in zip(sessions, prompts):
        assert session.committed[len(ids):] == reference(ids, 12)


def test_a_mixed_step_answers_each_draft_as_alone(tiny_models, target):
    """Greedy and sampled drafts (with and without a proposal, empty ones too) in one step: each verdict is
    the one its draft gets stepped alone on another engine."""
    from sled_protocol import SamplingParams

    vocab = vocab_hash(tiny_models.target)
    ids = encode(tiny_models, PROMPTS[3])
    plan = [([5, 6, 7], None, None),
            ([9, 3], SamplingParams(0.8, top_k=20, seed=1), [([9, 4], [0.6, 0.4]), ([3], [1.0])]),
            ([], None, None),
            ([11, 12, 13, 14], SamplingParams(1.2, top_p=0.9, seed=2), None),  # token only: q' a point mass
            ([], SamplingParams(0.6, seed=3), None)]
    batch = []
    for index, (tokens, params, q) in enumerate(plan):
        session = EdgeSession(f"m{index}", "dev", vocab, list(ids[: 4 + index]), 4 + index + 20)
        draft = session.draft(list(tokens))
        batch.append(replace(draft, sampling=params, q_ids=tuple(tuple(i) for i, _ in q) if q else None,
                             q_probs=tuple(tuple(p) for _, p in q) if q else None))
    together = VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats()).step_until_answered(batch)
    alone = VerifierEngine(target, "v", max_sessions=8, stats=VerifierStats())
    for draft, outcome in zip(batch, together):
        [single] = alone.step_until_answered([draft])
        assert outcome.verdict.kind is VerdictKind.VERIFIED and outcome.verdict == single.verdict


def test_calibration_times_each_batch_at_several_widths_so_a_token_is_priced_apart_from_a_draft(tiny_models, target):
    """At one width (k + 1 tokens a row) tokens are always (k + 1) x drafts and nothing tells a draft's cost from a
    token's, which the devices' draft lengths are priced on: every batch size the free slots hold is timed at
    each width, twice, on scratch slots that go back to the pool."""
    engine = VerifierEngine(target, "v-calibrate", 8, VerifierStats())
    free = len(engine.kv.free)
    samples = engine.calibrate(batch_sizes=(1, 4, 64), max_tokens=16)  # 64: more than the 8 slots, left out
    assert sorted((drafts, tokens) for drafts, tokens, _ in samples) == sorted(
        [(1, 1), (1, 2), (1, 4), (1, 8), (4, 4), (4, 8), (4, 16)] * 2)  # 4 x 8: more than 16 tokens
    assert all(seconds > 0 for _, _, seconds in samples) and len(engine.kv.free) == free
