"""The in-place draft cache on the exports of real architectures: Llama (SmolLM2's shape) and Qwen2 with
grouped-query attention at their real head counts and head dims (random weights, two layers, a small
vocabulary), each against the exported graph's copying cache, logits and greedy drafts token for token."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sled_edge.draft_model import BoundCache, OnnxDraftModel
from sled_edge.drafter import Drafter

pytestmark = pytest.mark.slow

# name: (config class, hidden, heads, key/value heads, MLP width); head_dim = hidden / heads
SHAPES = {
    "smollm2": ("LlamaConfig", 576, 9, 3, 1536),          # SmolLM2-135M: head_dim 64, 3 query heads per KV head
    "qwen2": ("Qwen2Config", 896, 14, 2, 1024),           # Qwen2-0.5B: head_dim 64, 7 per KV head, qkv biases
    "llama3": ("LlamaConfig", 1024, 8, 2, 1024),          # Llama-3's head_dim 128, 4 per KV head
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory) -> dict[str, OnnxDraftModel]:
    import torch
    import transformers

    from sled_models.tiny import export_onnx

    config_name, hidden, heads, kv_heads, intermediate = SHAPES[request.param]
    config = getattr(transformers, config_name)(
        vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=0.2, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(root / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter
        export_onnx(root / "hf", root / "onnx")
    return {mode: OnnxDraftModel(root / "onnx", cache=mode) for mode in ("copy", "bound")}


def test_the_rewrite_recognises_grouped_query_exports(pair):
    import onnx

    from sled_edge.kv_graph import in_place_kv_graph

    model = pair["bound"]
    assert model.cache_mode == "bound" and isinstance(model.new_cache(), BoundCache)
    query_heads = json.loads((model.model_dir / "config.json").read_text())["num_attention_heads"]
    graph = in_place_kv_graph(onnx.load(str(model.model_dir / "model.onnx")), query_heads).graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    for node in attention:  # the cache keeps the exported KV heads; the repeat for the query heads is gone
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["kv_num_heads"] == model.heads < attributes["num_heads"] == query_heads
    assert not [node.name for node in graph.node if any(name.startswith("present.") for name in node.input)]


def test_same_logits_through_prefill_steps_rollback_and_growth(pair):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, pair["copy"].vocab_size, 400).tolist()
    caches = {mode: model.new_cache() for mode, model in pair.items()}
    position = 0
    for chunk, rollback_to in [(9, None), (1, None), (4, 6), (1, None), (290, None), (3, 200), (1, None)]:
        if rollback_to is not None:
            for cache in caches.values():
                cache.truncate(rollback_to)
            position = rollback_to
        piece = tokens[position:position + chunk]
        logits = {mode: model.feed(caches[mode], piece) for mode, model in pair.items()}
        position += chunk
        # logits of magnitude ~10 (wide margins for the greedy check): float32 sums in another order differ ~1e-4
        np.testing.assert_allclose(logits["bound"], logits["copy"], rtol=1e-4, atol=1e-3)
        assert int(np.argmax(logits["bound"])) == int(np.argmax(logits["copy"]))
    assert caches["bound"].capacity >= 512  # grew past 256 with the prefix carried over


def test_same_greedy_drafts_round_after_round(pair):
    committed = [5, 17, 99, 3, 42]
    drafters = {mode: Drafter(model) for mode, model in pair.items()}
    for accepted in [4, 0, 2, 6, 1]:
        drafts = {mode: drafter.propose(committed, 6).tokens for mode, drafter in drafters.items()}
        assert drafts["bound"] == drafts["copy"]
        base_len = len(committed)
        committed = committed + drafts["copy"][:accepted] + [7]
        for drafter in drafters.values():
            drafter.rollback(len(committed), base_len, accepted)
