"""The ONNX drafter: KV rollback equals a fresh prefill, and the cache is kept between rounds (no torch: these
run in the edge-only venv; that the export drafts what its torch original would is in test_models.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sled_edge.drafter import Drafter


@pytest.mark.parametrize("accepted", [0, 2, 5])
def test_rollback_equals_fresh_prefill(gpt2_onnx, accepted):
    """After a verdict the truncated cache drafts exactly what a drafter with no history would."""
    committed = [5, 17, 99, 3, 42]
    drafter = Drafter(gpt2_onnx)
    draft = drafter.propose(committed, 5).tokens
    base_len = len(committed)
    committed = committed + draft[:accepted] + [7]  # verifier: accept a, then its own next token
    drafter.rollback(len(committed), base_len, accepted)
    assert drafter.cache.length <= len(committed) - 1
    assert drafter.propose(committed, 4).tokens == Drafter(gpt2_onnx).propose(committed, 4).tokens


def test_cache_is_kept_between_rounds(gpt2_onnx):
    """No re-prefill per round: the second round feeds only the tokens the cache has not seen."""
    drafter = Drafter(gpt2_onnx)
    committed = list(range(10, 40))
    draft = drafter.propose(committed, 3).tokens
    assert drafter.cache.length == len(committed) + 2            # prefix + d1, d2 (d3 not yet fed)
    drafter.rollback(len(committed) + 4, len(committed), 3)        # all accepted + bonus
    fed: list[int] = []
    original_feed = gpt2_onnx.feed

    def spy(cache, tokens):
        fed.append(len(tokens))
        return original_feed(cache, tokens)

    gpt2_onnx.feed = spy
    try:
        drafter.propose(committed + draft + [1], 2).tokens
    finally:
        del gpt2_onnx.feed
    assert fed == [2, 1]  # d3 and the bonus token, then one token per further draft step


def test_empty_cache_logits_shape(gpt2_onnx):
    logits = gpt2_onnx.feed(gpt2_onnx.new_cache(), [1, 2, 3])
    assert logits.shape == (gpt2_onnx.vocab_size,) and np.isfinite(logits).all()


def test_a_greedy_proposal_never_touches_sampling(gpt2_onnx, monkeypatch):
    """Greedy and sampled paths apart: with every sampling function made to raise, a greedy round (None, or
    SamplingParams at temperature 0) drafts the argmax and carries no proposal."""
    import sled_edge.drafter as drafter_module
    from sled_protocol import SamplingParams

    committed = [5, 17, 99, 3, 42]
    expected = Drafter(gpt2_onnx).propose(committed, 4).tokens

    def forbidden(*args, **kwargs):
        raise AssertionError("a greedy round reached sampling code")

    for name in ("warp_probs", "sparse_proposal", "sample_proposal", "round_seed"):
        monkeypatch.setattr(drafter_module, name, forbidden)
    for sampling in (None, SamplingParams(temperature=0.0, top_k=5, seed=3)):
        proposal = Drafter(gpt2_onnx).propose(committed, 4, sampling)
        assert proposal.tokens == expected and proposal.sparse is None
    with pytest.raises(AssertionError, match="reached sampling code"):  # and the spies do see a sampled round
        Drafter(gpt2_onnx).propose(committed, 4, SamplingParams(temperature=0.8, seed=3))
