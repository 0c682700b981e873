"""Training loops of the model family: pre-training the target, distilling drafts from it (KL to its
logits on the corpus), and on-policy distillation on the target's own continuations; and the draft of
``sled-models distill`` (its trained layers on the target's hidden states, top-k logits and answers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sled_models.recipe import Arch, Schedule, get_lr

Progress = Callable[[int, dict[str, float]], None]


def make_model(arch: Arch, vocab_size: int, eos_id: int, seed: int, max_positions: int = 1024):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
            num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.heads,
            max_position_embeddings=max_positions, tie_word_embeddings=True,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
        return LlamaForCausalLM(config)
    if arch.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=arch.hidden, n_layer=arch.layers, n_head=arch.heads,
                            n_positions=max_positions, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown architecture {arch.arch!r}")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def random_batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int):
    """Endless random windows of ``seq_len`` tokens from one long token array (seeded)."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
        yield torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))


def _optimizer(model, schedule: Schedule):
    return torch.optim.AdamW(model.parameters(), lr=schedule.peak_lr, betas=(0.9, 0.95),
                             weight_decay=schedule.weight_decay)


def pretrain(model, tokens: np.ndarray, schedule: Schedule, progress: Progress) -> None:
    """Next-token cross-entropy on random corpus windows."""
    model.train()
    optimizer = _optimizer(model, schedule)
    batches = random_batches(tokens, schedule.batch, schedule.seq_len, schedule.seed)
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, schedule)
        x = next(batches)                                          # [B, T]
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress(step, {"loss": loss.item()})
    model.eval()


def kl_to_teacher(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over (masked) positions of KL(teacher || student), the soft-distillation loss."""
    student_logprobs = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)     # [B, T]
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distill(teacher, students: Sequence, schedules: Sequence[Schedule], batches, progress: Progress,
            mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Train every student on the same batches (one teacher forward per batch serves them all)."""
    optimizers = [_optimizer(s, sch) for s, sch in zip(students, schedules)]
    for student in students:
        student.train()
    for step in range(max(s.steps for s in schedules)):
        x = next(batches)
        with torch.inference_mode():
            teacher_logprobs = F.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
        teacher_logprobs = teacher_logprobs.clone()  # leave inference mode for autograd
        mask = mask_fn(x) if mask_fn else None
        losses = {}
        for index, (student, optimizer, schedule) in enumerate(zip(students, optimizers, schedules)):
            if step >= schedule.steps:
                continue
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, schedule)
            loss = kl_to_teacher(student(input_ids=x).logits, teacher_logprobs, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            losses[f"kl{index}"] = loss.item()
        progress(step, losses)
    for student in students:
        student.eval()


@torch.inference_mode()
def continuations(target, prompts: torch.Tensor, new_tokens: int, sample: bool, seed: int, pad_id: int) -> torch.Tensor:
    """The target's own continuations of ``prompts`` [B, P] -> [B, P + new_tokens] (greedy or T=1 samples)."""
    torch.manual_seed(seed)
    out = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=sample, top_k=0, temperature=1.0 if sample else None,
                          top_p=None, pad_token_id=pad_id)
    return out


# ---- sled-models distill: a draft of the target's own layers, on the target's answers (sled_models.distill)

def _collate(answers: list, first: int):
    """Right-padded training batch: the target's hidden states entering layer ``first`` [B, T, H] (each answer
    but its last token), its final hidden states [B, T, H] with their mask, and its top-k ids / logits at
    answer positions [B, T, k] with theirs."""
    width, rows = max(len(a.tokens) - 1 for a in answers), len(answers)
    k, size = answers[0].top_ids.shape[1], answers[0].hidden[-1].shape[1]
    inputs, hidden, hidden_mask = torch.zeros(rows, width, size), torch.zeros(rows, width, size), torch.zeros(rows, width)
    top_ids, top_logits = torch.zeros(rows, width, k, dtype=torch.long), torch.zeros(rows, width, k)
    top_mask = torch.zeros(rows, width)
    for row, a in enumerate(answers):
        n, p = len(a.tokens) - 1, a.prompt_len
        inputs[row, :n], hidden[row, :n], hidden_mask[row, :n] = a.hidden[first].float(), a.hidden[-1].float(), 1
        top_ids[row, p - 1 : n], top_logits[row, p - 1 : n], top_mask[row, p - 1 : n] = a.top_ids, a.top_logits.float(), 1
    return inputs, hidden, hidden_mask, top_ids, top_logits, top_mask


def distill_loss(top, batch, hidden_weight: float, ce_weight: float = 0.0):
    """The draft's trained layers ``top`` (and final norm) on the target's hidden states where they start:
    KL(target top-k || draft on the same ids) over answer positions + ``hidden_weight`` x the mean squared
    distance to the target's final hidden state (relative to its mean square) over every position +
    ``ce_weight`` x the cross-entropy of the draft's full distribution on the target's greedy token (the
    top-k KL alone says nothing of the ids outside the target's top k; greedy acceptance is the argmax)."""
    inputs, hidden, hidden_mask, top_ids, top_logits, top_mask = batch
    h = top.base_model(inputs_embeds=inputs).last_hidden_state                             # [B, T, H]
    head = top.get_output_embeddings().weight                                               # [V, H]
    student = (h.unsqueeze(2) * head[top_ids]).sum(-1)                                       # [B, T, k]
    teacher = F.log_softmax(top_logits, dim=-1)
    kl = (teacher.exp() * (teacher - F.log_softmax(student, dim=-1))).sum(-1)                # [B, T]
    kl = (kl * top_mask).sum() / top_mask.sum()
    mse = ((h - hidden) ** 2).mean(-1) / (hidden ** 2).mean(-1).clamp(min=1e-6)              # [B, T]
    mse = (mse * hidden_mask).sum() / hidden_mask.sum()
    logs = {"kl": kl.item(), "mse": mse.item()}
    loss = kl + hidden_weight * mse
    if ce_weight:
        answer = top_mask.bool()
        ce = F.cross_entropy(h[answer] @ head.T, top_ids[..., 0][answer])                  # greedy token: top-1
        loss, logs["ce"] = loss + ce_weight * ce, ce.item()
    return loss, logs


def train_draft(top, first: int, answers: list, recipe, held_out: list, progress,
                curve_every: int) -> list[dict]:
    """AdamW on the draft's trained layers ``top`` over random batches of answers, from the target's hidden
    states entering layer ``first`` (the frozen layers below compute exactly those); every ``curve_every``
    steps (and at both ends) the acceptance on ``held_out`` and the training seconds so far: the curve."""
    from sled_models.answers import acceptance

    schedule = recipe.train
    parameters = [p for p in top.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.peak_lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay)
    rng = np.random.default_rng(schedule.seed)
    curve, seconds = [], 0.0

    def point(step: int) -> None:
        top.eval()
        with torch.inference_mode():
            agree = [top(inputs_embeds=a.hidden[first][None, :].float()).logits[0, a.prompt_len - 1 :].argmax(-1).numpy()
                     == np.asarray(a.tokens[a.prompt_len :]) for a in held_out]
        curve.append({"step": step, "train_s": round(seconds, 1), **acceptance(agree, recipe.k)})
        top.train()

    point(0)
    for step in range(schedule.steps):
        started = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, schedule)
        rows = rng.choice(len(answers), min(schedule.batch, len(answers)), replace=False)
        loss, logs = distill_loss(top, _collate([answers[i] for i in rows], first), recipe.hidden_weight,
                                   recipe.ce_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        seconds += time.monotonic() - started
        progress.update(1)
        progress.set_postfix({key: round(value, 3) for key, value in logs.items()})
        if (step + 1) % curve_every == 0 or step + 1 == schedule.steps:
            point(step + 1)
    top.eval()
    return curve
