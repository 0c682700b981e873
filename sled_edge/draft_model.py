"""The draft model on the device: an optimum ONNX export (with past key values) run by onnxruntime.

The KV cache lives between rounds in a ``DraftCache``; after a verdict it is truncated to the
committed prefix (one explicit rollback step) instead of re-running the prompt every round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class DraftCache:
    """One session's draft KV cache: per layer key and value ``[1, H, L, D]``, and the tokens it covers."""

    past: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (no-op when already shorter)."""
        if length < self.length:
            self.past = {name: value[:, :, :length] for name, value in self.past.items()}
            self.length = length


class OnnxDraftModel:
    """Shared by every session on the device; ``InferenceSession.run`` is thread-safe."""

    def __init__(self, model_dir: str | Path, threads: int = 1) -> None:
        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export the draft with `optimum-cli export onnx "
                                    "--task text-generation-with-past` (or sled_models.tiny.export_onnx)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self.past_names or "position_ids" not in inputs:
            raise ValueError(f"{path} lacks past key values or position_ids: export with --task text-generation-with-past")
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        self.output_names = ["logits", *self.present_names]
        first = inputs[self.past_names[0]]
        self.cache_dtype = _NUMPY_TYPES[first.type]
        self.heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        config = json.loads((self.model_dir / "config.json").read_text())
        self.vocab_size: int = config["vocab_size"]
        eos = config.get("eos_token_id")
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def new_cache(self) -> DraftCache:
        empty = np.zeros((1, self.heads, 0, self.head_dim), dtype=self.cache_dtype)
        return DraftCache(past={name: empty for name in self.past_names}, length=0)

    def logits_all(self, tokens: list[int]) -> np.ndarray:
        """Logits after every position of ``tokens`` from an empty cache, ``[T, V]`` (for evaluation)."""
        cache = self.new_cache()
        feeds = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
            "position_ids": np.arange(len(tokens), dtype=np.int64)[None, :],
            **cache.past,
        }
        return self.session.run(["logits"], feeds)[0][0]

    def feed(self, cache: DraftCache, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to ``cache``; return the logits after the last one, ``[V]``."""
        n = len(tokens)
        feeds = {
            "input_ids": np.asarray([tokens], dtype=np.int64),                                   # [1, n]
            "attention_mask": np.ones((1, cache.length + n), dtype=np.int64),                    # [1, L+n]
            "position_ids": np.arange(cache.length, cache.length + n, dtype=np.int64)[None, :],  # [1, n]
            **cache.past,
        }
        logits, *presents = self.session.run(self.output_names, feeds)
        cache.past = dict(zip(self.past_names, presents))
        cache.length += n
        return logits[0, -1]
