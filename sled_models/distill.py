"""``sled-models distill``: a draft for any target, from the target itself.

Most targets have no small model of their tokenizer. This builds one per device class, of either kind:

- quantized (``QuantizedDraft``, the default recipe): the whole target, its products' weights quantized
  block-wise to 8 or 4 bits. No training, built in seconds; it agrees with the target as far as its
  weights do (SmolLM2-135M: mean accepted length ~4.5 at k=4 in 8 bits, ~2.9 in 4), at the target's depth,
  so it suits a target small enough for the device;
- trained (``DistilledDraft``, ``--recipe trained``): a few of the target's own layers (the first half from its start, the rest from its end) between its embeddings, final
norm and head, which stay frozen, so the draft speaks the target's vocabulary from the first step and
only the chosen layers learn to do the skipped layers' work. Stages, each cached under a key of the
target's identity and its part of the recipe (a rerun with both unchanged does nothing):

1. answers: the target's greedy answers to chat prompts (``sled_models.chat_prompts``, chat-templated
   when the target has a template). One ``generate`` pass keeps, at every position, the target's final
   hidden state and its top-k logits, so training never runs the target again and never needs the
   49,152-wide head of the target's full distribution;
2. train: per draft, KL to the target's top-k distribution (the student's logits on the same k ids)
   plus the distance to the target's final hidden state (the head is shared, so equal hidden states
   mean equal logits); acceptance on the held-out answers is recorded along the way (the curve);
3. export: optimum ONNX with past key values, fp32 and int8, tokenizer and chat template beside it (a
   quantized draft: the target's own fp32 export, once, then each draft's quantization of it);
4. eval: mean accepted length simulated exactly for greedy speculative decoding (Leviathan et al. 2023)
   along the target's answers to held-out prompts, for each ONNX draft; draft ms/token (onnxruntime,
   1 thread) next to the target's (torch, 1 thread). Written to ``report.json``.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path

from sled_models.answers import Answer, acceptance, encode_prompt, greedy_agreement, load_answers, save_answers, \
    target_answers
from sled_models.build import Stages, bar
from sled_models.recipe import DistilledDraft, DistillRecipe, QuantizedDraft, stage_key

__all__ = ["Answer", "acceptance", "distill_draft", "greedy_agreement", "layer_choice", "load_target", "make_draft"]

_LAYER = re.compile(r"^(.*\.(?:layers|h)\.)(\d+)(\..*)$")  # Llama, Qwen2, Mistral...: layers.N; GPT-2: h.N


def load_target(path: Path):
    """(model, tokenizer) from a Hugging Face directory or a .gguf file (its cached float32 conversion,
    ``sled_verifier.gguf``: dequantized once, the configs' EOS id made the tokenizer's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sled_verifier.gguf import model_directory

    directory = model_directory(path)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory, local_files_only=True)


def target_stamp(path: Path) -> list:
    """What identifies the target for the cache: name, size and mtime of its file or of its directory's files."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[str(p), (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def layer_choice(total: int, keep: int, frozen: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``keep`` of ``total`` layers as (frozen, trained): the first half (rounded down) from the start and
    the rest from the end; the first ``frozen`` of them (default: those from the start) kept as they are,
    the others trained to do the skipped layers' work."""
    keep = max(1, min(keep, total))
    first = keep // 2
    chosen = tuple(range(first)) + tuple(range(total - (keep - first), total))
    frozen = first if frozen is None else max(0, min(frozen, keep - 1))
    return chosen[:frozen], chosen[frozen:]


def make_draft(target, layers: tuple[int, ...]):
    """A model of the target's architecture with only ``layers`` (in order), the target's weights copied;
    every parameter outside those layers (embeddings, final norm, head) frozen."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen2 and others: one entry per layer
        config.layer_types = [config.layer_types[i] for i in layers]
    draft = AutoModelForCausalLM.from_config(config)
    source = target.state_dict()

    def origin(name: str) -> str:
        match = _LAYER.match(name)
        return f"{match[1]}{layers[int(match[2])]}{match[3]}" if match else name

    draft.load_state_dict({name: source[origin(name)] for name in draft.state_dict()})
    for name, parameter in draft.named_parameters():
        parameter.requires_grad_(_LAYER.match(name) is not None)
    return draft.eval()


def torch_logits(model):
    import torch

    def logits_of(tokens: list[int]):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    return logits_of


def build_answers(work: Path, recipe: DistillRecipe, hidden_layers: tuple[int, ...], target) -> None:
    from sled_models.chat_prompts import held_out_prompts, train_prompts

    model, tokenizer = target()
    work.mkdir(parents=True, exist_ok=True)
    train = train_prompts(recipe.train_prompts) if _trained(recipe) else []  # a quantized draft learns nothing
    for split, prompts in (("train", train), ("held_out", held_out_prompts(recipe.eval_prompts))):
        new_tokens = recipe.new_tokens if split == "train" else recipe.eval_tokens
        if not prompts:
            save_answers(work / f"answers_{split}.pt", [])
            continue
        batches = -(-len(prompts) // recipe.generate_batch)
        with bar(f"answers ({split}, tokens a row)", batches * new_tokens) as progress:
            answers = target_answers(model, [encode_prompt(tokenizer, p) for p in prompts], new_tokens,
                                     recipe.generate_batch, recipe.top_k if _trained(recipe) else 0, progress,
                                     hidden_layers)
        save_answers(work / f"answers_{split}.pt", answers)


def build_draft(work: Path, name: str, layers: tuple[tuple[int, ...], tuple[int, ...]], recipe: DistillRecipe,
                target) -> None:
    """Train the draft's top layers on the answers, assemble the whole draft, save it with the tokenizer."""
    model, tokenizer = target()
    frozen, trained = layers
    top = make_draft(model, trained)
    train, held_out = load_answers(work / "answers_train.pt"), load_answers(work / "answers_held_out.pt")
    from sled_models.train import train_draft

    with bar(f"train {name}", recipe.train.steps) as progress:
        curve = train_draft(top, len(frozen), train, recipe, held_out, progress, max(1, recipe.train.steps // 2))
    draft = make_draft(model, frozen + trained)
    state = draft.state_dict()
    for key, value in top.state_dict().items():
        match = _LAYER.match(key)
        if match:
            state[f"{match[1]}{int(match[2]) + len(frozen)}{match[3]}"] = value
    draft.load_state_dict(state)
    draft.save_pretrained(work / "hf" / name)
    tokenizer.save_pretrained(work / "hf" / name)
    (work / f"curve_{name}.json").write_text(json.dumps(curve, indent=2))


def build_export(out: Path, work: Path, name: str) -> None:
    from sled_models.export import export_draft, quantize_int8

    with bar(f"export {name}", 2) as progress:
        export_draft(work / "hf" / name, out / name)
        progress.update(1)
        quantize_int8(out / name, out / f"{name}-int8")
        progress.update(1)


def build_quantized(out: Path, work: Path, draft: QuantizedDraft) -> None:
    from sled_models.export import quantize_blockwise

    with bar(f"quantize {draft.name}", 1) as progress:
        quantize_blockwise(work / "onnx-target", out / draft.name, draft.bits, draft.block_size, draft.symmetric)
        progress.update(1)


def build_target_export(work: Path, target_path: Path) -> None:
    """The target's own fp32 ONNX export with past key values, the quantized drafts' common source."""
    from sled_models.export import export_draft

    with bar("export target", 1) as progress:
        export_draft(target_path, work / "onnx-target")
        progress.update(1)


def _trained(recipe: DistillRecipe) -> list[DistilledDraft]:
    return [d for d in recipe.drafts if isinstance(d, DistilledDraft)]


def _variants(draft) -> tuple[str, ...]:
    """The ONNX directories a draft is exported as: a trained one fp32 and int8, a quantized one as it is."""
    return (draft.name,) if isinstance(draft, QuantizedDraft) else (draft.name, f"{draft.name}-int8")


def _describe(draft, layers: dict, work: Path) -> dict:
    if isinstance(draft, QuantizedDraft):
        return {"mimics": draft.mimics, "kind": "quantized", "bits": draft.bits, "block_size": draft.block_size,
                "symmetric": draft.symmetric}
    return {"mimics": draft.mimics, "kind": "trained", "frozen_layers": list(layers[draft.name][0]),
            "trained_layers": list(layers[draft.name][1]),
            "curve": json.loads((work / f"curve_{draft.name}.json").read_text())}


def build_report(out: Path, work: Path, target_path: Path, recipe: DistillRecipe, layers: dict, target) -> None:
    from sled_edge.draft_model import OnnxDraftModel
    from sled_models.evaluate import draft_ms_per_token, target_ms_per_token
    from sled_protocol.vocab import vocab_hash

    model, _ = target()
    held_out = load_answers(work / "answers_held_out.pt")
    context = held_out[0].tokens[:64]
    drafts = {}
    with bar("eval", sum(len(_variants(d)) for d in recipe.drafts)) as progress:
        for draft in recipe.drafts:
            entry = _describe(draft, layers, work)
            for variant in _variants(draft):
                onnx = OnnxDraftModel(out / variant, threads=1)
                entry[variant] = {"path": variant, "cache": onnx.cache_mode, "vocab_hash": vocab_hash(out / variant),
                                  **acceptance(greedy_agreement(onnx.logits_all, held_out), recipe.k),
                                  "ms_per_token": draft_ms_per_token(out / variant, context)}
                progress.update(1)
            drafts[draft.name] = entry
    seconds = json.loads((work / "seconds.json").read_text()) if (work / "seconds.json").is_file() else {}
    report = {"target": str(target_path), "target_layers": model.config.num_hidden_layers,
              "target_ms_per_token": target_ms_per_token(model, context), "k": recipe.k,
              "held_out": {"prompts": len(held_out), "answer_tokens": sum(len(a.tokens) - a.prompt_len for a in held_out)},
              "drafts": drafts, "build_seconds": seconds, "recipe": asdict(recipe)}
    (out / "report.json").write_text(json.dumps(report, indent=2))


def distill_draft(target_path: Path, out: Path, recipe: DistillRecipe, threads: int | None = None) -> dict:
    """Build (or bring up to date) the drafts for ``target_path`` in ``out``; the report."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    target_path, out = Path(target_path), Path(out)
    if not target_path.exists():
        raise FileNotFoundError(f"{target_path} not found: give a Hugging Face model directory or a .gguf file")
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    target = cache(lambda: load_target(target_path))  # loaded only by a stage that runs
    total = _layer_count(target_path)
    layers = {d.name: layer_choice(total, d.layers, d.frozen) for d in _trained(recipe)}
    hidden_layers = tuple(sorted({len(frozen) for frozen, _ in layers.values()})) + (-1,) if layers else ()
    answers_key = stage_key(target_stamp(target_path), recipe.train_prompts, recipe.new_tokens, recipe.top_k,
                            recipe.eval_prompts, recipe.eval_tokens, hidden_layers, recipe.version)
    cpu_s: dict[str, float] = {}

    def run(name: str, key: str, outputs: list[Path], build) -> None:
        def timed() -> None:  # CPU seconds of all threads: the figure a shared machine inflates least
            started = time.process_time()
            build()
            cpu_s[name] = round(time.process_time() - started, 1)
        stages.run(name, key, outputs, timed)

    run("answers", answers_key, [work / "answers_train.pt", work / "answers_held_out.pt"],
        lambda: build_answers(work, recipe, hidden_layers, target))
    export_keys = []
    target_export_key = stage_key(target_stamp(target_path), "onnx-v1")
    if len(_trained(recipe)) < len(recipe.drafts):
        run("export target", target_export_key, [work / "onnx-target"], lambda: build_target_export(work, target_path))
    for draft in recipe.drafts:
        if isinstance(draft, QuantizedDraft):
            export_keys.append(stage_key(target_export_key, draft, "nbits-v1"))
            run(f"quantize {draft.name}", export_keys[-1], [out / draft.name],
                lambda draft=draft: build_quantized(out, work, draft))
            continue
        train_key = stage_key(answers_key, draft, layers[draft.name], recipe.train, recipe.hidden_weight,
                               recipe.ce_weight)
        run(f"train {draft.name}", train_key, [work / "hf" / draft.name, work / f"curve_{draft.name}.json"],
            lambda draft=draft: build_draft(work, draft.name, layers[draft.name], recipe, target))
        export_keys.append(stage_key(train_key, "onnx-v1"))
        run(f"export {draft.name}", export_keys[-1], [out / draft.name, out / f"{draft.name}-int8"],
            lambda draft=draft: build_export(out, work, draft.name))
    _record_seconds(work, {name: {"wall_s": wall, "cpu_s": cpu_s[name]} for name, wall in stages.seconds.items()})
    run("eval", stage_key(export_keys, recipe.k, "eval-v1"), [out / "report.json"],
        lambda: build_report(out, work, target_path, recipe, layers, target))
    return json.loads((out / "report.json").read_text())


def _layer_count(target_path: Path) -> int:
    """The target's layer count from its config, without loading the weights (a GGUF's conversion is cached)."""
    from sled_verifier.gguf import model_directory

    config = json.loads((model_directory(target_path) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config.get("n_layer"))


def _record_seconds(work: Path, seconds: dict[str, dict]) -> None:
    """Each stage's build time (wall and CPU seconds) from the run that built it (a cached stage keeps its own)."""
    path = work / "seconds.json"
    if not seconds:
        return
    merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **seconds}
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
