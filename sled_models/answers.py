"""The target's greedy answers to chat prompts, kept with what a draft learns from (its top-k logits and hidden
states), and a draft's agreement with them: greedy speculative decoding replayed exactly along each answer
(Leviathan et al. 2023). ``sled-models distill`` generates them once and judges every draft by them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["Answer", "acceptance", "encode_prompt", "eos_ids", "greedy_agreement", "load_answers", "save_answers",
           "target_answers"]


@dataclass
class Answer:
    """One prompt and the target's greedy answer: ``tokens`` [L] (prompt first); the target's hidden states
    at each of the first L-1 tokens ``hidden[i]`` [L-1, H] (i: the input of layer i; -1: the final, normed
    one), and its top-k logits ``top_ids`` / ``top_logits`` [L-P, k] at the positions that produced the
    answer (P-1 .. L-2)."""

    tokens: list[int]
    prompt_len: int
    hidden: dict | None = None
    top_ids: object = None
    top_logits: object = None


def eos_ids(model) -> list[int]:
    """The end-of-answer ids from the model's configs (a GGUF tokenizer may name another eos token)."""
    eos = model.generation_config.eos_token_id or model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The request as the device sends it: chat-templated with the generation prompt when there is a template."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(prompt).input_ids


def target_answers(model, prompts: list[list[int]], new_tokens: int, batch: int, top_k: int, progress,
                   hidden_layers: tuple[int, ...] = ()) -> list[Answer]:
    """Greedy answers of ``model`` to token ``prompts``, ``batch`` at a time (left-padded), each cut after its
    EOS; with ``top_k`` > 0, the top-k logits and the hidden states of ``hidden_layers`` an ``Answer`` carries.
    ``progress`` advances by one a generated step (``new_tokens`` a batch)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Tick(StoppingCriteria):  # generate's one per-step hook: progress on a minute-long call, never a stop
        def __call__(self, input_ids, scores, **kwargs):
            progress.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    stops = eos_ids(model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (stops or [0])[0]
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])                      # [B, P]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 top_k=None, top_p=None, temperature=None, pad_token_id=pad, eos_token_id=stops,
                                 return_dict_in_generate=True, output_hidden_states=top_k > 0, output_logits=top_k > 0,
                                 stopping_criteria=StoppingCriteriaList([Tick()]))
        generated = out.sequences[:, width:]                                                   # [B, G]
        progress.update(new_tokens - generated.shape[1])  # the steps an early end (every row at EOS) skipped
        if top_k > 0:
            hidden = {i: torch.cat([step[i] for step in out.hidden_states], dim=1) for i in hidden_layers}  # [B, P+G-1, H]
            top_logits, top_ids = torch.stack(out.logits, dim=1).topk(top_k, dim=-1)          # [B, G, k]
        for row, prompt in enumerate(chunk):
            new = generated[row].tolist()
            end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
            answer = Answer(prompt + new[:end], len(prompt))
            if top_k > 0:
                answer.hidden = {i: h[row, width - len(prompt) : width + end - 1].half().clone() for i, h in hidden.items()}
                answer.top_ids = top_ids[row, :end].int().clone()
                answer.top_logits = top_logits[row, :end].half().clone()
            answers.append(answer)
    return answers


def greedy_agreement(logits_of, answers: list[Answer]) -> list[np.ndarray]:
    """Per answer: does the draft's argmax equal the target's next token, at every answer position."""
    agree = []
    for a in answers:
        logits = logits_of(a.tokens[:-1])                                                    # [L-1, V]
        agree.append(np.asarray(logits[a.prompt_len - 1 :]).argmax(-1) == np.asarray(a.tokens[a.prompt_len :]))
    return agree


def acceptance(agree: list[np.ndarray], k: int) -> dict[str, float]:
    from sled_models.evaluate import mean_acceptance_length

    return {"alpha": round(float(np.mean(np.concatenate(agree))), 4),
            f"mean_accepted_length_k{k}": round(float(np.mean([mean_acceptance_length(a, k) for a in agree])), 3)}


def save_answers(path: Path, answers: list[Answer]) -> None:
    import torch

    torch.save([asdict(a) for a in answers], path)


def load_answers(path: Path) -> list[Answer]:
    import torch

    return [Answer(**a) for a in torch.load(path, weights_only=True)]
