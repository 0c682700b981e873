"""Proactive drafting: the next round drafted while a round is verified changes when rounds are sent, never
what is sent. A guess proposes, to the last bit, what the drafter would have proposed after the verdict;
through a real broker and verifier, sessions with it on and off commit the same tokens (greedy: the target's
own; sampled: the same sample for the same seed), and a cancelled generation leaves the device exact."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import PROMPTS, RoundCounter, edge_config
from sled_edge.ahead import AheadPolicy
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import Drafter, Guess
from sled_protocol import SamplingParams

SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=4321)


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_a_guess_is_what_the_drafter_proposes_after_an_all_accepted_verdict(gpt2_onnx, sampling):
    committed = [5, 17, 99, 3, 42, 8, 250]
    ahead, plain = Drafter(gpt2_onnx), Drafter(gpt2_onnx)
    first = ahead.propose(committed, 4, sampling)
    guess = Guess.after(committed, first.tokens, 3)
    ahead.draft_ahead(guess, sampling)
    assert guess.next_token is not None and guess.proposal is not None

    # The drafter without a guess, after the verdict "all 4 accepted, next token = the guess":
    assert plain.propose(committed, 4, sampling).tokens == first.tokens
    committed = committed + first.tokens + [guess.next_token]
    plain.rollback(len(committed), len(committed) - 5, 4)
    expected = plain.propose(committed, 3, sampling)
    assert guess.agrees(committed)
    assert guess.proposal.tokens == expected.tokens
    if sampling is not None:  # the very proposal q' that goes on the wire, bit for bit
        for got, want in zip(guess.proposal.sparse, expected.sparse):
            assert np.array_equal(got.ids, want.ids) and np.array_equal(got.probs, want.probs)
    assert ahead.cache.length == plain.cache.length  # both wait for the same verdict from here


@pytest.mark.parametrize("accepted", [0, 2, 4])
def test_a_disagreeing_verdict_drops_the_guess_and_rolls_the_cache_back(gpt2_onnx, accepted):
    committed = [5, 17, 99, 3, 42]
    drafter = Drafter(gpt2_onnx)
    draft = drafter.propose(committed, 4).tokens
    guess = Guess.after(committed, draft, 4)
    drafter.draft_ahead(guess, None)
    other = (guess.next_token + 1) % gpt2_onnx.vocab_size  # the verifier's next token is not the guess
    after = committed + draft[:accepted] + [other]
    assert not guess.agrees(after)
    drafter.rollback(len(after), len(committed), accepted)
    assert drafter.propose(after, 4).tokens == Drafter(gpt2_onnx).propose(after, 4).tokens


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("accepted", [2, 4])
def test_after_a_dropped_guess_the_next_round_is_the_one_without_a_guess(tiny_models, model, accepted):
    """A dropped guess fed the round's last draft token and more; the rollback must leave the cache where the
    round alone would have, or the next round's passes differ and a seeded sample's q' differs in its low bits
    (found on the Llama export: the token ids agreed, q' did not)."""
    draft_model = OnnxDraftModel(tiny_models.gpt2_onnx if model == "gpt2" else tiny_models.target_onnx)
    committed = [5, 17, 99, 3, 42, 8, 250]
    guessing, alone = Drafter(draft_model), Drafter(draft_model)
    draft = guessing.propose(committed, 4, SAMPLED)
    assert alone.propose(committed, 4, SAMPLED).tokens == draft.tokens
    guess = Guess.after(committed, draft.tokens, 4)
    guessing.draft_ahead(guess, SAMPLED)
    other = (guess.next_token + 1) % draft_model.vocab_size  # the verifier's next token is not the guess
    after = committed + draft.tokens[:accepted] + [other]
    for drafter in (guessing, alone):
        drafter.rollback(len(after), len(committed), accepted, len(draft.tokens))
    assert guessing.cache.length == alone.cache.length
    got, want = guessing.propose(after, 4, SAMPLED), alone.propose(after, 4, SAMPLED)
    assert got.tokens == want.tokens
    for mine, theirs in zip(got.sparse, want.sparse):
        assert np.array_equal(mine.ids, theirs.ids) and np.array_equal(mine.probs, theirs.probs)


def test_an_abandoned_guess_stops_before_its_next_forward_pass(gpt2_onnx):
    committed = [5, 17, 99, 3, 42]
    drafter = Drafter(gpt2_onnx)
    draft = drafter.propose(committed, 3).tokens
    length = drafter.cache.length
    guess = Guess.after(committed, draft, 4)
    guess.abandoned = True
    drafter.draft_ahead(guess, None)
    assert guess.next_token is None and guess.proposal is None and drafter.cache.length == length


@pytest.mark.parametrize(("hit_rate", "draft_ms", "round_ms", "pays"), [
    (0.5, 1.0, 20.0, True),     # a round trip longer than a draft round: a guess costs no time, and often holds
    (0.15, 1.0, 20.0, True),    # ... even rarely holding
    (0.05, 1.0, 20.0, False),   # hardly ever holding: the device's CPU goes to drafts thrown away
    (0.9, 4.0, 20.0, True),     # the k+1 passes of a guess just fit in the round trip
    (0.8, 10.0, 20.0, False),   # a slow draft behind a fast network: the verdict lands mid-guess
])
def test_drafting_ahead_where_it_pays(hit_rate, draft_ms, round_ms, pays):
    policy = AheadPolicy(hit_rate=hit_rate, draft_s=draft_ms / 1000, round_s=round_ms / 1000)
    assert policy.pays(4) is pays
    if not pays:  # it keeps looking: every explore_every-th round guesses anyway, so the hit rate stays measured
        decisions = []
        for _ in range(policy.explore_every):
            decisions.append(policy.pays(4))
            policy.observe_round(4, 4 * draft_ms / 1000, round_ms / 1000)
        assert decisions.count(True) == 1


def test_the_policy_learns_hit_rate_and_timings():
    policy = AheadPolicy()
    for _ in range(200):
        policy.observe_round(4, 0.004, 0.050)
        policy.observe_guess(False)
    assert policy.draft_s == pytest.approx(0.001, rel=1e-3) and policy.round_s == pytest.approx(0.050, rel=1e-3)
    assert policy.hit_rate < 1e-4 and policy.rounds % policy.explore_every == 8 and not policy.pays(4)
    for _ in range(60):
        policy.observe_guess(True)
    assert policy.hit_rate > 0.9 and policy.pays(4)


def ALWAYS() -> AheadPolicy:  # noqa: N802
    """Guess every round (each is an exploration round), whatever this machine's timings say."""
    return AheadPolicy(explore_every=1)


async def generate_both_ways(verifier, draft_dir, device_id: str, prompt_text: str, max_new: int,
                             sampling: SamplingParams | None, **overrides):
    results = {}
    for proactive in (True, False):
        config = edge_config(verifier, draft_dir, f"{device_id}-{proactive:d}", proactive=proactive, **overrides)
        async with EdgeDevice(config, ahead=ALWAYS()) as device:
            prompt = device.encode_prompt(prompt_text)
            results[proactive] = await device.generate(prompt, max_new, sampling=sampling)
    return prompt, results[True], results[False]


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.parametrize("draft", ["target_onnx", "gpt2_onnx"])
async def test_greedy_output_is_the_targets_with_and_without_proactive_drafting(tiny_models, verifier, reference,
                                                                                device_id, draft):
    """The target's own export is always right (nearly every round is sent from its guess); the GPT-2 is
    mostly wrong (guesses are dropped): either way the tokens are the target's."""
    prompt, on, off = await generate_both_ways(verifier, getattr(tiny_models, draft), device_id, PROMPTS[1], 40, None)
    assert on.token_ids == off.token_ids == reference(prompt, 40)
    assert off.guesses == off.guesses_held == 0
    assert on.guesses > 0 and on.guesses_held <= on.guesses
    if draft == "target_onnx":
        assert on.guesses_held >= on.rounds // 2
    assert on.spec_decode["num_drafts"] == on.rounds and sum(on.spec_decode["num_accepted_tokens_per_pos"]) == on.accepted_tokens


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.parametrize("draft", ["target_onnx", "gpt2_onnx"])
async def test_a_sampled_session_is_the_same_sample_with_and_without_proactive_drafting(tiny_models, verifier,
                                                                                        device_id, draft):
    """Same seed, adaptive k: the guessed rounds carry the seeds, k and proposals the unguessed ones would."""
    _, on, off = await generate_both_ways(verifier, getattr(tiny_models, draft), device_id, PROMPTS[0], 32, SAMPLED,
                                          proposal_tokens=8)
    assert on.token_ids == off.token_ids and len(on.token_ids) == 32
    assert (on.rounds, on.draft_tokens, on.accepted_tokens) == (off.rounds, off.draft_tokens, off.accepted_tokens)
    if draft == "target_onnx":
        assert on.guesses_held > 0  # the comparison covered guessed rounds


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_generation_cancelled_mid_guess_leaves_the_device_exact(tiny_models, verifier, reference, device_id):
    rounds = RoundCounter(after=3)
    config = edge_config(verifier, tiny_models.target_onnx, device_id, draft_tokens=2)
    async with EdgeDevice(config, observer=rounds, ahead=ALWAYS()) as device:
        prompt = device.encode_prompt(PROMPTS[3])
        cancelled = asyncio.create_task(device.generate(prompt, 60))
        await rounds.reached.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        stopped = await device.generate(prompt, 60, on_tokens=lambda new: True)  # stops after its first round
        assert stopped.finish_reason == "stop" and stopped.rounds == 1
        again = await device.generate(prompt, 24)
    assert again.token_ids == reference(prompt, 24) and again.guesses_held > 0


def test_the_flag_and_its_environment_variable(tiny_models):
    from sled_edge.__main__ import build_parser
    from sled_protocol.config import config_from_args

    parse = build_parser().parse_args
    env = {"SLED_DRAFT": str(tiny_models.gpt2_onnx)}
    assert config_from_args(EdgeConfig, parse(["generate", "--prompt", "x"]), env).proactive is True
    assert config_from_args(EdgeConfig, parse(["generate", "--prompt", "x"]), {**env, "SLED_PROACTIVE": "0"}).proactive is False
    assert config_from_args(EdgeConfig, parse(["generate", "--prompt", "x", "--no-proactive"]), env).proactive is False
