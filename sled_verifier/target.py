"""The target model: any Hugging Face causal LM from a local directory, scored over ragged batches.

Each session keeps its own KV cache (a tuple of per-layer ``(key, value)`` tensors ``[H, L_i, D]``).
One verification pass left-pads every session's cache to the longest, right-pads every session's
input ``[x[n-1], d_1..d_k]`` to the longest, and runs ONE forward with an attention mask hiding the
padding and explicit position ids, so sessions with different context lengths and draft lengths share
the pass. The mask makes padding invisible, so each session's logits are those of scoring it alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: key, value [H, L, D]


@dataclass(frozen=True)
class ScoredBatch:
    logits: torch.Tensor          # [B, M, V] target logits after each input position
    target_ids: torch.Tensor      # [B, M] their argmax
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: key, value [B, H, C+M, D]
    cache_width: int              # C: the padded cache length the inputs were appended after


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eos_ids_of(model_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (or config.json); a list either way."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class TargetModel:
    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype), local_files_only=True,
        ).to(self.device).eval()
        self.vocab_size: int = self.model.config.vocab_size
        config = self.model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos_ids = torch.tensor(eos_ids_of(self.model_dir), dtype=torch.int64, device=self.device)
        self.model_id = self.model_dir.name

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> KV:
        """The KV cache of ``tokens`` (may be empty: then an empty cache)."""
        from transformers import DynamicCache

        if not tokens:
            return ()
        cache = DynamicCache()
        ids = torch.tensor([list(tokens)], dtype=torch.int64, device=self.device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return tuple((k[0], v[0]) for k, v in _cache_layers(cache))

    @torch.inference_mode()
    def score(self, caches: Sequence[KV], inputs: Sequence[Sequence[int]]) -> ScoredBatch:
        """One forward over every session's ``inputs`` after its cache; see the module docstring."""
        from transformers import DynamicCache

        batch = len(inputs)
        cache_lens = [_length(kv) for kv in caches]
        input_lens = [len(x) for x in inputs]
        width, m_max = max(cache_lens), max(input_lens)
        dev = self.device

        input_ids = torch.zeros(batch, m_max, dtype=torch.int64, device=dev)          # [B, M]
        mask = torch.zeros(batch, width + m_max, dtype=torch.int64, device=dev)       # [B, C+M]
        positions = torch.zeros(batch, m_max, dtype=torch.int64, device=dev)          # [B, M]
        for i, (tokens, c_i) in enumerate(zip(inputs, cache_lens)):
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[i, width - c_i : width + len(tokens)] = 1
            # Padding slots repeat the last real position: never past the model's position table.
            positions[i] = c_i + torch.arange(m_max).clamp(max=len(tokens) - 1)

        cache = DynamicCache()
        if width > 0:
            template = next(kv for kv in caches if _length(kv) > 0)
            for layer, (k0, v0) in enumerate(template):
                keys = k0.new_zeros(batch, k0.shape[0], width, k0.shape[2])           # [B, H, C, D]
                values = v0.new_zeros(batch, v0.shape[0], width, v0.shape[2])
                for i, kv in enumerate(caches):
                    if cache_lens[i]:
                        keys[i, :, width - cache_lens[i] :] = kv[layer][0]
                        values[i, :, width - cache_lens[i] :] = kv[layer][1]
                cache.update(keys, values, layer)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        return ScoredBatch(out.logits, out.logits.argmax(dim=-1), _cache_layers(cache), width)


def session_cache(scored: ScoredBatch, row: int, old_len: int, keep_inputs: int) -> KV:
    """Session ``row``'s new cache: its old ``old_len`` entries plus its first ``keep_inputs`` inputs."""
    start, stop = scored.cache_width - old_len, scored.cache_width + keep_inputs
    return tuple((k[row, :, start:stop].clone(), v[row, :, start:stop].clone()) for k, v in scored.layers)


def _length(kv: KV) -> int:
    return kv[0][0].shape[1] if kv else 0
