"""``sled-models distill`` on a tiny target it has never seen: drafts of the target's own layers, exported
(fp32 and int8) so the device loads them with its in-place cache, the target's vocabulary, acceptance
measured, and a rerun that does nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sled_models import distill
from sled_models.recipe import DISTILL_RECIPES
from sled_models.tiny import TinySpec, build_model, build_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("distill")
    build_tokenizer(root / "tokenizer")
    target = build_model(TinySpec(arch="llama", layers=4, hidden=64, heads=4, seed=5), root / "tokenizer", root / "target")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter
        report = distill.distill_draft(target, root / "drafts", DISTILL_RECIPES["smoke"], threads=2)
    return target, root / "drafts", report


def test_layer_choice_keeps_the_ends_of_the_target():
    assert distill.layer_choice(30, 6) == ((0, 1, 2), (27, 28, 29))
    assert distill.layer_choice(30, 3) == ((0,), (28, 29))
    assert distill.layer_choice(4, 1) == ((), (3,))
    assert distill.layer_choice(2, 9) == ((0,), (1,))  # never more than the target has
    assert distill.layer_choice(30, 6, frozen=0) == ((), (0, 1, 2, 27, 28, 29))  # every layer trained
    assert distill.layer_choice(30, 3, frozen=2) == ((0, 28), (29,))


def test_a_draft_starts_as_the_target_layers_it_names(built):
    target_dir, _, _ = built
    target = distill.load_target(target_dir)[0]
    draft = distill.make_draft(target, (0, 3))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        embedded = target.model.embed_tokens(ids)
        positions = target.model.rotary_emb(embedded, torch.arange(5)[None])
        expected = embedded
        for index in (0, 3):  # the target's layers 0 and 3 alone, then its norm and head
            expected = target.model.layers[index](expected, position_embeddings=positions)
            expected = expected[0] if isinstance(expected, tuple) else expected
        expected = target.lm_head(target.model.norm(expected))
        torch.testing.assert_close(draft(input_ids=ids).logits, expected)
    trained = {name for name, p in draft.named_parameters() if p.requires_grad}
    assert trained and all(".layers." in name for name in trained)  # embeddings, norm and head stay frozen


def test_every_device_class_gets_an_edge_draft_of_the_target_vocabulary(built):
    from sled_edge.draft_model import OnnxDraftModel
    from sled_protocol.vocab import vocab_hash

    target_dir, out, report = built
    assert set(report["drafts"]) == {"large", "small", "whole"}
    for name, entry in report["drafts"].items():
        for variant in (name, f"{name}-int8") if entry["kind"] == "trained" else (name,):
            model = OnnxDraftModel(out / variant)
            assert model.cache_mode == "bound"
            assert vocab_hash(out / variant) == vocab_hash(target_dir) == entry[variant]["vocab_hash"]
            assert 0.0 <= entry[variant]["alpha"] <= 1.0 and entry[variant]["ms_per_token"] > 0
            assert 1.0 <= entry[variant][f"mean_accepted_length_k{report['k']}"] <= report["k"] + 1
        if entry["kind"] == "trained":
            assert [point["step"] for point in entry["curve"]] == [0, 3, 6]
    assert len(report["drafts"]["large"]["frozen_layers"]) + len(report["drafts"]["large"]["trained_layers"]) == 2


def test_the_exported_draft_is_the_one_trained(built):
    """Acceptance of the ONNX fp32 draft equals that of the trained layers on the target's hidden states
    (the last point of the curve): the assembled draft has the right layers in the right places."""
    _, _, report = built
    for name, entry in report["drafts"].items():
        if entry["kind"] != "trained":
            continue
        assert entry[name]["alpha"] == pytest.approx(entry["curve"][-1]["alpha"], abs=0.02)


def test_a_quantized_draft_is_the_whole_target_in_blockwise_weights(built):
    """The quantized class: the target's every layer, its products MatMulNBits (8 bits here), and it agrees
    with the target far better than a trained draft of a few layers does on the same held-out answers."""
    import onnx

    _, out, report = built
    entry = report["drafts"]["whole"]
    assert (entry["kind"], entry["bits"], entry["block_size"]) == ("quantized", 8, 32)
    graph = onnx.load(str(out / "whole" / "model.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert "MatMulNBits" in ops and not any(op == "MatMul" and _constant_weight(node, graph) for op, node in
                                            zip(ops, graph.node))
    # A random tiny target's logits are near ties, so 8 bits flip some argmaxes (SmolLM2: 0.96 agree); still far
    # more agree than with any trained draft of its layers.
    assert entry["whole"]["alpha"] > max(report["drafts"][name][name]["alpha"] for name in ("large", "small"))


def _constant_weight(node, graph) -> bool:
    return any(name in {init.name for init in graph.initializer} for name in node.input[1:])


def test_acceptance_is_greedy_speculative_decoding_replayed():
    answers = [distill.Answer(tokens=[1, 2, 5, 6, 7, 8], prompt_len=2)]
    logits = np.eye(10)[[2, 5, 9, 7, 8]]  # argmax after each of the first 5 tokens: agrees, agrees, no, yes, yes
    agree = distill.greedy_agreement(lambda tokens: logits[: len(tokens)], answers)
    assert agree[0].tolist() == [True, False, True, True]
    assert distill.acceptance(agree, 4) == {"alpha": 0.75, "mean_accepted_length_k4": 2.0}


def test_a_rerun_with_the_same_target_and_recipe_does_nothing(built, monkeypatch):
    target_dir, out, report = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(distill, "load_target", lambda path: pytest.fail("the target was loaded again"))
    assert distill.distill_draft(target_dir, out, DISTILL_RECIPES["smoke"]) == report
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
