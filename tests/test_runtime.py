"""The runtime seam: both runtimes load the same target, refuse what they cannot serve, and agree."""

from __future__ import annotations

import json

import pytest
import torch

from sled_verifier.runtime import load_target


def scores(target, contexts, rounds):
    target.init_kv(max_slots=len(contexts) + 1, max_length=128)
    slots = [target.kv.acquire() for _ in contexts]
    target.forward_rows(slots, [0] * len(contexts), contexts, logits=False)
    return target.forward_rows(slots, [len(c) for c in contexts], rounds)


CONTEXTS = [[5, 9, 11, 40, 7], [3] * 17, [8]]
ROUNDS = [[1, 2, 3], [4], [6, 7]]


def test_both_runtimes_give_the_same_logits(tiny_models):
    """To float rounding: the compiled runtime's norms, rotary embedding and SiLU are native calls on a CPU
    (``sled_verifier.tokenwise``), rounded differently from torch's operators (~1e-5 on logits of ~15-20 here,
    a few float32 ulps)."""
    reference = scores(load_target(tiny_models.target, "transformers", "cpu"), CONTEXTS, ROUNDS)
    compiled = scores(load_target(tiny_models.target, "compiled", "cpu"), CONTEXTS, ROUNDS)
    for row, tokens in enumerate(ROUNDS):
        assert torch.allclose(reference[row, : len(tokens)], compiled[row, : len(tokens)], atol=1e-4, rtol=0)


def test_the_compiled_runtime_refuses_other_architectures_by_name(tiny_models):
    with pytest.raises(ValueError, match="compiled runtime serves .* not 'gpt2'; use --runtime transformers"):
        load_target(tiny_models.gpt2, "compiled", "cpu")


@pytest.mark.parametrize(("runtime", "options", "complaint"), [
    ("onnx", {}, "unknown runtime 'onnx'"),
    ("compiled", {"device_map": "auto"}, "device-map is served by the transformers runtime"),
    ("transformers", {"compile": "reduce-overhead"}, "compile applies to the compiled runtime only"),
    ("compiled", {"compile": "fast"}, "unknown compile mode 'fast'"),
])
def test_options_a_runtime_cannot_honour_are_refused(tiny_models, runtime, options, complaint):
    with pytest.raises(ValueError, match=complaint):
        load_target(tiny_models.target, runtime, "cpu", **options)


@pytest.mark.parametrize("device_map", ["auto", json.dumps({"": "cpu"})])
def test_device_map_places_the_target_with_accelerate(tiny_models, device_map):
    """transformers' device_map (accelerate) places the layers; on this CPU-only machine every layer lands on
    the CPU, so the logits must equal the unplaced target's and each layer's KV slots sit beside the layer."""
    placed = load_target(tiny_models.target, "transformers", "cpu", device_map=device_map)
    assert hasattr(placed.model, "hf_device_map") and placed.layer_devices == [torch.device("cpu")] * len(placed.layer_devices)
    reference = scores(load_target(tiny_models.target, "transformers", "cpu"), CONTEXTS, ROUNDS)
    assert torch.equal(scores(placed, CONTEXTS, ROUNDS), reference)
    assert [k.device for k in placed.kv.keys] == placed.layer_devices


def test_the_static_forward_serves_a_context_limit_that_is_not_a_power_of_two(tiny_models):
    """Buckets round a 33-token prefill up to 64 tokens; with a 40-position limit the bucket is capped there
    (padding only writes the spare slot) instead of the step failing, and the logits match the eager forward."""
    from sled_verifier.compiled import CompiledTarget

    eager, static = load_target(tiny_models.target, "compiled", "cpu"), CompiledTarget(tiny_models.target, "cpu")
    static.static = True  # no graph (compile off): the static forward runs eagerly
    prompt = list(range(3, 36))
    results = []
    for target in (eager, static):
        target.init_kv(max_slots=2, max_length=40)
        slot = target.kv.acquire()
        target.forward_rows([slot], [0], [prompt[:-1]], logits=False)
        results.append(target.forward_rows([slot], [len(prompt) - 1], [prompt[-1:]])[0, 0])
    assert torch.allclose(results[0], results[1], atol=1e-4)
