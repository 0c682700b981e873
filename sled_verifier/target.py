"""The target model: any Hugging Face causal LM from a local directory, scored over ragged batches.

Every session's KV cache lives in a slot of one preallocated ``SlotKV`` (``sled_verifier.kvslots``).
A forward takes rows (slot, start, tokens): each row's tokens are appended at its own offset, inputs
are right-padded to the longest row, and a 4-D additive attention mask lets each query see exactly its
own session's positions up to itself, with explicit position ids. Sessions with different context
lengths and draft lengths share ONE forward, and each row's logits are those of scoring it alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from sled_verifier.kvslots import SlotKV


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


class TargetModel:
    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype), local_files_only=True,
        ).to(self.device).eval()
        config = self.model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                or layer_types != {"full_attention"}:
            raise ValueError(f"{self.model_dir}: sliding-window or hybrid attention is not supported by the "
                             "verifier's batched mask yet (verification would differ from the target alone)")
        self.vocab_size: int = config.vocab_size
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos_ids = torch.tensor(eos_ids_of(self.model_dir), dtype=torch.int64, device=self.device)
        self.model_id = self.model_dir.name
        self.kv: SlotKV | None = None

    def init_kv(self, max_slots: int, max_length: int) -> SlotKV:
        config = self.model.config
        layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv = SlotKV(layers, heads, head_dim, self.model.dtype, self.device, max_slots=max_slots,
                         max_length=min(max_length, self.max_positions or max_length))
        return self.kv

    @torch.inference_mode()
    def forward_rows(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits ``[B, M, V]`` of each row's ``inputs`` after the first ``starts[i]`` positions of its slot;
        the rows' keys and values are written into their slots (positions start .. start + len - 1)."""
        if self.kv is None:
            self.init_kv(max_slots=64, max_length=self.max_positions or 4096)
        dev = self.device
        m_max = max(len(x) for x in inputs)
        input_ids = torch.zeros(len(inputs), m_max, dtype=torch.int64, device=dev)                  # [B, M]
        for row, tokens in enumerate(inputs):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        lens = torch.tensor([len(x) for x in inputs], device=dev)
        starts_t = torch.tensor(list(starts), dtype=torch.int64, device=dev)
        # Padding queries repeat the row's last real position: never past the model's position table.
        offsets = torch.minimum(torch.arange(m_max, device=dev)[None, :], (lens - 1)[:, None])       # [B, M]
        positions = starts_t[:, None] + offsets                                                        # [B, M]
        width = int((starts_t + lens).max())
        visible = torch.arange(width, device=dev)[None, None, :] <= positions[:, :, None]             # [B, M, W]
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=dev)
        mask = mask.masked_fill(~visible, torch.finfo(self.model.dtype).min)[:, None]                 # [B, 1, M, W]
        view = self.kv.view(torch.tensor(list(slots), device=dev), starts_t, lens, m_max)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=view,
                         use_cache=True, cache_position=torch.arange(m_max, device=dev))
        return out.logits
