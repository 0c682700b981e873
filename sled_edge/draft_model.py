"""The draft model on the device: an optimum ONNX export (with past key values) run by onnxruntime.

The KV cache lives between rounds in a cache object; after a verdict it is truncated to the committed
prefix (one explicit rollback step) instead of re-running the prompt every round. Two caches:

- ``bound`` (default on the CPU): the graph is rewritten at load (``sled_edge.kv_graph``) so attention
  reads and writes preallocated ``[1, H, capacity, D]`` buffers bound with IOBinding; a token writes only
  its own key/value and rollback only moves the length. Capacity doubles when full (amortised copy).
- ``copy``: the graph as exported, ``present = Concat(past, new)``: each token copies the whole cache.
  Kept for other execution providers (the GPU kernel of GroupQueryAttention takes fp16 only) and for
  exports the rewrite does not recognise, and as the baseline of ``bench/draft_cache.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from sled_edge.providers import resolve_provider

log = structlog.get_logger("sled_edge.draft_model")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
CACHE_MODES = ("auto", "bound", "copy")
_INITIAL_CAPACITY = 256


@dataclass
class DraftCache:
    """One session's draft KV cache as the exported graph takes it: per layer key and value ``[1, H, L, D]``."""

    past: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (no-op when already shorter)."""
        if length < self.length:
            self.past = {name: value[:, :, :length] for name, value in self.past.items()}
            self.length = length


class BoundCache:
    """One session's KV buffers ``[1, H, capacity, D]``, updated in place; positions from ``length`` on are
    stale and get overwritten by the next tokens fed."""

    def __init__(self, names: list[str], heads: int, head_dim: int, dtype: type, capacity: int) -> None:
        self.length = 0
        self._shape, self._dtype = (1, heads, 0, head_dim), dtype
        self.buffers: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        self._allocate(names, capacity)

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    def _allocate(self, names: list[str], capacity: int) -> None:
        old = self.buffers
        self.buffers = {name: np.zeros((1, self._shape[1], capacity, self._shape[3]), self._dtype) for name in names}
        for name, buffer in old.items():
            buffer_length = min(self.length, capacity)
            self.buffers[name][:, :, :buffer_length] = buffer[:, :, :buffer_length]
        # The OrtValues share the numpy memory: onnxruntime writes the new positions straight into it.
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(buffer) for name, buffer in self.buffers.items()}

    def reserve(self, length: int) -> None:
        if length > self.capacity:
            self._allocate(list(self.buffers), max(length, 2 * self.capacity))

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (no-op when already shorter): no data moves."""
        self.length = min(self.length, length)


class OnnxDraftModel:
    """Shared by every session on the device; runs are thread-safe, each session has its own cache."""

    def __init__(self, model_dir: str | Path, threads: int = 1, provider: str = "auto", cache: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export the draft with `sled-models export-draft` "
                                    "(optimum, --task text-generation-with-past)")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, not {cache!r}")
        config = json.loads((self.model_dir / "config.json").read_text())
        self.vocab_size: int = config["vocab_size"]
        eos = config.get("eos_token_id")
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.provider = resolve_provider(provider)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = [self.provider] + (["CPUExecutionProvider"] if self.provider != "CPUExecutionProvider" else [])
        self.cache_mode = "copy"
        if cache == "bound" or (cache == "auto" and self.provider == "CPUExecutionProvider"):
            self.session = self._bound_session(path, config, options, providers)
        if self.cache_mode == "copy":
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        if self.session.get_providers()[0] != self.provider:  # onnxruntime falls back silently when a GPU fails
            log.warning("provider_fell_back", wanted=self.provider, using=self.session.get_providers()[0])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self.past_names or "position_ids" not in inputs:
            raise ValueError(f"{path} lacks past key values or position_ids: export with --task text-generation-with-past")
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        self.output_names = ["logits", *self.present_names]
        first = inputs[self.past_names[0]]
        self.cache_dtype = _NUMPY_TYPES[first.type]
        self.heads, self.head_dim = int(first.shape[1]), int(first.shape[3])

    def _bound_session(self, path: Path, config: dict, options, providers: list[str]):
        """The session over the in-place KV graph, or None (and ``cache_mode`` stays ``copy``) when the
        export is not one the rewrite knows."""
        try:
            import onnx

            from sled_edge.kv_graph import UnsupportedGraph, in_place_kv_graph

            heads = config.get("num_attention_heads") or config.get("n_head")
            graph = in_place_kv_graph(onnx.load(str(path)), int(heads))
            session = ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
        except (ImportError, UnsupportedGraph, ValueError) as exc:  # ValueError: a model over protobuf's 2 GB
            log.warning("draft_cache_copy", reason=str(exc), draft=str(self.model_dir))
            return None
        self.cache_mode = "bound"
        return session

    def new_cache(self) -> DraftCache | BoundCache:
        if self.cache_mode == "bound":
            return BoundCache(self.past_names, self.heads, self.head_dim, self.cache_dtype, _INITIAL_CAPACITY)
        empty = np.zeros((1, self.heads, 0, self.head_dim), dtype=self.cache_dtype)
        return DraftCache(past={name: empty for name in self.past_names}, length=0)

    def logits_all(self, tokens: list[int]) -> np.ndarray:
        """Logits after every position of ``tokens`` from an empty cache, ``[T, V]`` (for evaluation)."""
        return self._run(self.new_cache(), tokens)

    def feed(self, cache: DraftCache | BoundCache, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to ``cache``; return the logits after the last one, ``[V]``."""
        return self._run(cache, tokens)[-1]

    def _run(self, cache: DraftCache | BoundCache, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to ``cache``; logits after each of them, ``[n, V]``."""
        n, total = len(tokens), cache.length + len(tokens)
        feeds = {
            "input_ids": np.asarray([tokens], dtype=np.int64),                                   # [1, n]
            "position_ids": np.arange(cache.length, total, dtype=np.int64)[None, :],             # [1, n]
        }
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)                       # [1, L+n]
        if isinstance(cache, BoundCache):
            return self._run_bound(cache, feeds, total)
        logits, *presents = self.session.run(self.output_names, {**feeds, **cache.past})
        cache.past = dict(zip(self.past_names, presents))
        cache.length = total
        return logits[0]

    def _run_bound(self, cache: BoundCache, feeds: dict[str, np.ndarray], total: int) -> np.ndarray:
        from sled_edge.kv_graph import SEQLENS_INPUT, TOTAL_LENGTH_INPUT

        cache.reserve(total)
        binding = self.session.io_binding()
        feeds[SEQLENS_INPUT] = np.array([total - 1], dtype=np.int32)   # GQA: attend to positions 0..total-1
        feeds[TOTAL_LENGTH_INPUT] = np.array(total, dtype=np.int32)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for past, present in zip(self.past_names, self.present_names):  # one buffer in, the same buffer out
            binding.bind_ortvalue_input(past, cache.values[past])
            binding.bind_ortvalue_output(present, cache.values[past])
        self.session.run_with_iobinding(binding)
        cache.length = total
        return binding.get_outputs()[0].numpy()[0]
