"""The runtime seam: what the engine needs from a target, and the runtimes that provide it.

The engine, the scheduler's calibration and the benchmarks speak only ``TargetRuntime``: KV slots, one forward
over ragged rows that returns logits, and the target's limits. Two runtimes implement it:

- ``transformers`` (``sled_verifier.target.TransformersTarget``): the model's own transformers forward with
  slot attention plugged into transformers' attention interface. Any causal LM without sliding windows. The
  reference.
- ``compiled`` (``sled_verifier.compiled.CompiledTarget``): one readable forward for the Llama family (Llama,
  Qwen2, Mistral) over the same weights, with static shape buckets and ``torch.compile`` (CUDA graphs on a
  GPU); eager on CPU unless asked, where it still skips transformers' per-call mask and cache machinery.

Both compute each row exactly as if it were alone (``sled_verifier.invariant``), so a verdict never depends on
which sessions share its step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from sled_verifier.config import RUNTIMES



class KVSlots(Protocol):
    """A session's cache is a slot; the engine only acquires, releases and counts them."""

    max_slots: int
    capacity: int
    free: list[int]

    def acquire(self) -> int: ...

    def release(self, slot: int) -> None: ...

    def bytes_per_token(self) -> int: ...


class TargetRuntime(Protocol):
    name: str                     # "transformers" or "compiled"
    model_id: str
    device: torch.device          # where logits come back
    vocab_size: int
    max_positions: int | None
    eos_ids: torch.Tensor         # int64 ids on ``device``
    batch_invariance: str         # how products are kept batch-invariant: rows-of-<g>, tiles-<n>, or off
    weights: torch.dtype | None   # the products' weights packed in this dtype by the native kernels (bfloat16), or None
    packs_rows: bool              # rows of any lengths share a forward at no padding cost (``logit_rows`` served)
    kv: KVSlots | None

    def init_kv(self, max_slots: int, max_length: int) -> KVSlots: ...

    def forward_rows(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                     logits: bool = True) -> torch.Tensor:
        """Logits ``[B, M, V]`` of each row's ``inputs`` after the first ``starts[i]`` positions of its slot,
        writing the rows' keys and values into their slots; ``logits=False``: prefill, logits not needed. Where
        ``packs_rows``, ``logit_rows=R`` projects only the first R rows (``[R, M_R, V]``), the rest writing caches,
        and ``packed_logits=True`` returns the logits as ``target.PackedLogits`` (no padded copy)."""
        ...


def cpu_clock():
    """The clock a forward's cost is read on, on a CPU: this thread's CPU seconds with one torch thread (another
    process on the core does not count, nor the event loop's work meanwhile), the process's with several (the
    kernels' worker threads do the work)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def load_target(model_dir: str | Path, runtime: str = "transformers", device: str = "auto",
                dtype: str = "float32", *, device_map: str = "", compile: str = "auto",
                batch_invariant: bool = True) -> TargetRuntime:
    """The target in the chosen runtime. ``ValueError`` for a model or option the runtime cannot serve.
    ``model_dir`` may be a ``.gguf`` file: its cached float32 conversion is loaded (``sled_verifier.gguf``)."""
    from sled_verifier.gguf import is_gguf, model_directory

    if is_gguf(model_dir):
        target = load_target(model_directory(model_dir), runtime, device, dtype, device_map=device_map,
                             compile=compile, batch_invariant=batch_invariant)
        target.model_id = Path(model_dir).name
        return target
    if runtime == "transformers":
        from sled_verifier.target import TransformersTarget

        if compile not in ("auto", "off"):
            raise ValueError("--compile applies to the compiled runtime only (use --runtime compiled)")
        return TransformersTarget(model_dir, device, dtype, device_map=device_map, batch_invariant=batch_invariant)
    if runtime == "compiled":
        from sled_verifier.compiled import CompiledTarget

        if device_map:
            raise ValueError("--device-map is served by the transformers runtime (use --runtime transformers)")
        return CompiledTarget(model_dir, device, dtype, compile=compile, batch_invariant=batch_invariant)
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
