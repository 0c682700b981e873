"""The draft's in-place KV cache (``bound``) against the exported graph's copying one (``copy``): the same
logits and greedy drafts for both architectures, through rollback, buffer growth and concurrent sessions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sled_edge.draft_model import BoundCache, DraftCache, OnnxDraftModel
from sled_edge.drafter import Drafter

ARCHS = ["target_onnx", "gpt2_onnx"]  # Llama (rotary) and GPT-2 (scale computed from shapes)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_models) -> dict[str, OnnxDraftModel]:
    path = getattr(tiny_models, request.param)
    return {mode: OnnxDraftModel(path, cache=mode) for mode in ("copy", "bound")}


def test_the_rewrite_applies_and_is_the_cpu_default(tiny_models, pair):
    assert pair["bound"].cache_mode == "bound" and isinstance(pair["bound"].new_cache(), BoundCache)
    assert pair["copy"].cache_mode == "copy" and isinstance(pair["copy"].new_cache(), DraftCache)
    assert OnnxDraftModel(tiny_models.gpt2_onnx).cache_mode == "bound"


def test_same_logits_through_prefill_steps_rollback_and_growth(pair):
    """Chunks of several sizes, a rollback into the middle, then past the initial capacity (256)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, pair["copy"].vocab_size, 400).tolist()
    caches = {mode: model.new_cache() for mode, model in pair.items()}
    position = 0
    for chunk, rollback_to in [(7, None), (1, None), (3, 5), (1, None), (300, None), (2, 150), (1, None)]:
        if rollback_to is not None:
            for cache in caches.values():
                cache.truncate(rollback_to)
            position = rollback_to
        piece = tokens[position:position + chunk]
        logits = {mode: model.feed(caches[mode], piece) for mode, model in pair.items()}
        position += chunk
        assert caches["bound"].length == caches["copy"].length == position
        np.testing.assert_allclose(logits["bound"], logits["copy"], rtol=1e-4, atol=1e-4)
        assert int(np.argmax(logits["bound"])) == int(np.argmax(logits["copy"]))
    assert caches["bound"].capacity >= 512  # grew past 256 (at 311 tokens), the prefix carried over


def test_logits_all_matches(pair):
    tokens = list(range(3, 40))
    np.testing.assert_allclose(pair["bound"].logits_all(tokens), pair["copy"].logits_all(tokens), rtol=1e-4, atol=1e-4)


def test_same_greedy_drafts_round_after_round(pair):
    committed = [5, 17, 99, 3, 42]
    drafters = {mode: Drafter(model) for mode, model in pair.items()}
    for accepted in [4, 0, 2, 6]:
        drafts = {mode: drafter.propose(committed, 6).tokens for mode, drafter in drafters.items()}
        assert drafts["bound"] == drafts["copy"]
        base_len = len(committed)
        committed = committed + drafts["copy"][:accepted] + [7]
        for drafter in drafters.values():
            drafter.rollback(len(committed), base_len, accepted)


def test_concurrent_sessions_keep_their_own_cache(pair):
    """Sessions drafting in threads at once each get what they would alone."""
    model = pair["bound"]
    prompts = [[i, i + 1, i + 2, 30 + i] for i in range(6)]
    alone = [Drafter(model).propose(prompt, 8).tokens for prompt in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda prompt: Drafter(model).propose(prompt, 8).tokens, prompts))
    assert together == alone


def test_unknown_cache_mode_is_refused(tiny_models):
    with pytest.raises(ValueError, match="cache must be one of"):
        OnnxDraftModel(tiny_models.gpt2_onnx, cache="paged")
