"""The verifier's configuration: one frozen dataclass; flags and SLED_* variables derive from it.

Its defaults are the only defaults: the wire limits (message bytes, draft and context tokens) are
``sled_protocol.Limits``'s, which receivers without a configuration of their own also use; the batch limits are the ones
the scheduler runs with (``SchedulePolicy`` takes its defaults from here, ``SchedulePolicy.from_config`` converts a
config), and ``VerifierEngine`` takes its context and prefill defaults from here too.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sled_protocol import Limits
from sled_protocol.config import described as _help
from sled_protocol.config import BrokerConfig, require, require_duration


RUNTIMES = ("transformers", "compiled")  # sled_verifier.runtime
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")  # sled_verifier.compiled

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str, free_bytes: int) -> int:
    """Bytes of a size such as ``2GiB``, ``512MB``, ``1000000`` or ``40%`` (of ``free_bytes``); ConfigError if not."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(%|[kmgt]?i?b?)\s*", text.lower())
    require(match is not None and match.group(2) in (*_UNITS, "%"),
            f"kv_memory {text!r} is not a size (2GiB, 512MiB, bytes) or a percentage of free memory (50%)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        require(0 < number <= 100, f"kv_memory {text!r}: a percentage must be in (0, 100]")
        return int(free_bytes * number / 100)
    require(number >= 1, f"kv_memory {text!r} must be at least one byte")
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class VerifierConfig(BrokerConfig):
    target: str = field(metadata=_help(
        "directory of a Hugging Face causal LM (config, weights, tokenizer.json), or a .gguf file (dequantized "
        "once to float32 and cached in $SLED_CACHE, default ~/.cache/sled)"))
    verifier_id: str = field(default="", metadata=_help("this verifier's topic level; empty: the host name"))
    device: str = field(default="auto", metadata=_help("torch device: auto (cuda when present), cpu, cuda:0"))
    dtype: str = field(default="float32", metadata=_help(
        "dtype of the target weights: float32, or bfloat16 (on a GPU torch's; on a CPU with AMX or AVX512-BF16 the "
        "products' weights alone, in the verifier's own kernels: half the bytes a step reads, the rest float32)"))
    runtime: str = field(default="transformers", metadata=_help(
        "transformers (any causal LM; the reference) or compiled (Llama/Qwen2/Mistral: our own forward, "
        "static shape buckets and torch.compile; CUDA graphs on a GPU)"))
    compile: str = field(default="auto", metadata=_help(
        "compiled runtime: auto (reduce-overhead on a GPU, off on CPU), off, default, reduce-overhead, max-autotune"))
    device_map: str = field(default="", metadata=_help(
        "transformers runtime: spread the target over this machine's GPUs (auto, balanced, sequential, or a "
        "JSON module-to-device map); needs accelerate"))
    batch_invariant: bool = field(default=True, metadata=_help(
        "matrix products in fixed row blocks, so a row's logits never depend on its batch (bitwise on CPU)"))
    threads: int = field(default=0, metadata=_help("torch CPU threads; 0: all cores"))
    max_wait_ms: float = field(default=50.0, metadata=_help(
        "longest a draft waits for others to join its step (the added-wait SLO); the scheduler waits only "
        "while merging lowers the server cost per draft"))
    min_wait_gain: float = field(default=0.02, metadata=_help(
        "waiting for predicted drafts must cut the step cost per draft by at least this fraction"))
    max_batch_drafts: int = field(default=256, metadata=_help("most drafts verified in one step"))
    max_batch_tokens: int = field(default=4096, metadata=_help("most tokens scored in one step (drafts and prefill)"))
    max_sessions: int = field(default=256, metadata=_help(
        "sessions kept (at most what the KV memory holds); when full, a new one evicts a finished or idle session, "
        "else it is refused as overloaded"))
    device_max_sessions: int = field(default=16, metadata=_help(
        "sessions one device holds (a Pi's worth of concurrent API sessions); another is refused as overloaded "
        "unless one of its own has finished or is idle"))
    device_max_drafts: int = field(default=16, metadata=_help(
        "drafts of one device waiting in the queue; more are refused as overloaded"))
    device_step_tokens: int = field(default=32, metadata=_help(
        "tokens one device's drafts add to a step (k + 1 each; its first draft always goes), so one device's "
        "many sessions cannot lengthen every step for the others"))
    session_idle_s: float = field(default=60.0, metadata=_help(
        "a session silent this long may be evicted for another device's (its device vanished without a Close)"))
    max_draft_tokens: int = field(default=Limits.max_draft_tokens, metadata=_help("longest draft accepted from an edge"))
    max_context_tokens: int = field(default=Limits.max_context_tokens, metadata=_help("longest committed context accepted"))
    prefill_chunk_tokens: int = field(default=64, metadata=_help(
        "a context is prefilled in chunks of this many tokens at multiples of it in its own positions, one chunk a "
        "step, so its cache never depends on the sessions beside it"))
    max_prefill_tokens: int = field(default=256, metadata=_help("prefill tokens per step, all sessions together"))
    device_prefill_tokens: int = field(default=64, metadata=_help("prefill tokens per step of one device's sessions"))
    kv_memory: str = field(default="50%", metadata=_help(
        "KV cache budget, fixed at start: a size (2GiB, 512MiB, bytes) or a percentage of the device's free "
        "memory; sessions beyond it are refused as overloaded"))
    max_message_bytes: int = field(default=Limits.max_message_bytes, metadata=_help(
        "largest draft message accepted; 0: what a draft at max_context_tokens needs (36 KiB at 4096)"))
    max_drafts_per_s: float = field(default=500.0, metadata=_help("per-device draft rate limit (burst: 2 s worth); 0: off"))
    max_bytes_per_s: float = field(default=1_048_576.0, metadata=_help(
        "per-device inbound byte rate limit (burst: 2 s worth, at least one largest message); 0: off"))
    max_refusals_per_s: float = field(default=5.0, metadata=_help(
        "refusals answered and logged per device (burst: 4 s worth); beyond, only counted "
        "(sled_verifier_refusals_suppressed); 0: no budget"))
    stats_interval_s: float = field(default=10.0, metadata=_help("seconds between stats log lines"))
    status_interval_s: float = field(default=3.0, metadata=_help(
        "seconds between status republications (edges on a broker without cluster-wide retained messages "
        "find this verifier within it; keep it below the edges' discovery_timeout_s)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_help("address of the Prometheus /metrics endpoint"))
    metrics_port: int = field(default=9464, metadata=_help("port of the Prometheus /metrics endpoint; 0: off"))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error"))

    def __post_init__(self) -> None:
        if not self.verifier_id:
            object.__setattr__(self, "verifier_id", socket.gethostname().split(".")[0] or "verifier")
        if Path(self.target).suffix.lower() == ".gguf" and not Path(self.target).is_dir():
            require(Path(self.target).is_file(), f"target {self.target!r} does not exist")
        else:
            require(Path(self.target).is_dir(), f"target {self.target!r} is not a directory (nor a .gguf file)")
            require(Path(self.target, "config.json").is_file(), f"target {self.target!r} has no config.json")
        self.check_broker(self.log_level, verifier_id=self.verifier_id)
        require_duration(self.max_wait_ms, "max_wait_ms", allow_zero=True)
        require(0 <= self.min_wait_gain < 1, "min_wait_gain must be in [0, 1)")
        for name in ("max_batch_drafts", "max_batch_tokens", "max_sessions", "max_draft_tokens",
                     "max_context_tokens", "prefill_chunk_tokens", "max_prefill_tokens",
                     "device_max_sessions", "device_max_drafts", "device_prefill_tokens", "device_step_tokens"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1")
        require(self.max_message_bytes >= 0, "max_message_bytes must be >= 0 (0: derived from max_context_tokens)")
        require(self.max_batch_tokens > self.max_draft_tokens, "max_batch_tokens must exceed max_draft_tokens")
        require(self.device_prefill_tokens >= self.prefill_chunk_tokens <= self.max_prefill_tokens,
                "device_prefill_tokens and max_prefill_tokens must each hold one prefill_chunk_tokens chunk")
        require_duration(self.session_idle_s, "session_idle_s")
        parse_memory(self.kv_memory, free_bytes=1)  # the form only; the size is resolved at start
        require(self.threads >= 0, "threads must be >= 0")
        # Which runtime takes which options is checked once, by sled_verifier.runtime.load_target (exit 78 too).
        require(self.runtime in RUNTIMES, f"runtime must be one of {', '.join(RUNTIMES)}")
        require(self.compile in COMPILE_MODES, f"compile must be one of {', '.join(COMPILE_MODES)}")
        for name in ("max_drafts_per_s", "max_bytes_per_s", "max_refusals_per_s"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, f"{name} must be a finite number >= 0")
        require(0 <= self.metrics_port < 65536, "metrics_port must be 0..65535")
        require_duration(self.stats_interval_s, "stats_interval_s")
        require_duration(self.status_interval_s, "status_interval_s")
