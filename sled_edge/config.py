"""The edge's configuration: one frozen dataclass; flags and SLED_* variables derive from it."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from sled_protocol import Limits
from sled_protocol.config import described as _help
from sled_protocol.config import BrokerConfig, ConfigError, require, require_duration


@dataclass(frozen=True)
class EdgeConfig(BrokerConfig):
    draft: str = field(metadata=_help("directory of an ONNX draft (optimum export with past key values, tokenizer.json)"))
    device_id: str = field(default="", metadata=_help("this device's topic level; empty: the host name"))
    verifier: str = field(default="", metadata=_help("verifier id to use; empty: the least loaded with our vocabulary"))
    draft_tokens: int = field(default=0, metadata=_help("draft tokens k per round; 0: adaptive (best expected tokens/s)"))
    k_max: int = field(default=8, metadata=_help(
        f"the most draft tokens the adaptive k may choose, 1..{Limits.max_draft_tokens} (what a verifier accepts by "
        "default; each announces its own limit, its max_draft_tokens, which caps k)", formerly=("max_draft_tokens",)))
    priced: bool = field(default=True, metadata=_help(
        "adaptive k against the verifier's announced step cost: the k (0: the server decodes one token) that costs "
        "it least per committed token, never slower than k = 0; off: the best tokens/s for this device alone"))
    proposal_tokens: int = field(default=16, metadata=_help("m: top-m draft probabilities sent per token when sampling"))
    proactive: bool = field(default=True, metadata=_help(
        "draft the next round while a round is verified, assuming all its tokens are accepted (sent at once when "
        "the verdict agrees, dropped when not; output unchanged)"))
    timeout_s: float = field(default=5.0, metadata=_help("seconds to wait for a verdict before resending"))
    retries: int = field(default=5, metadata=_help("resends of one round before giving up"))
    outage_timeout_s: float = field(default=60.0, metadata=_help(
        "how long a round waits for a lost broker to come back, or for an overloaded verifier to take it"))
    discovery_timeout_s: float = field(default=5.0, metadata=_help(
        "seconds to wait for a verifier's status; above the verifiers' status_interval_s where the broker's "
        "retained messages are node-local (RabbitMQ)"))
    threads: int = field(default=1, metadata=_help("onnxruntime intra-op threads"))
    provider: str = field(default="auto", metadata=_help(
        "onnxruntime execution provider: auto (CUDA, ROCm or DirectML when the wheel has one, else CPU), or a "
        "name such as cpu, cuda, tensorrt, coreml, openvino, xnnpack, or a full name (CUDAExecutionProvider)"))
    http_host: str = field(default="127.0.0.1", metadata=_help("serve: address of the OpenAI-compatible API"))
    http_port: int = field(default=8080, metadata=_help("serve: port of the OpenAI-compatible API"))
    model_name: str = field(default="", metadata=_help("serve: model id in the API; empty: sled-<draft dir name>"))
    default_max_tokens: int = field(default=128, metadata=_help("serve: max_tokens when a request names none"))
    api_key: str = field(default="", metadata=_help(
        "serve: require 'Authorization: Bearer <key>' on /v1 (401 otherwise); empty: no key"))
    allowed_hosts: str = field(default="", metadata=_help(
        "serve: Host header names the API answers besides its bound address (and loopback names when bound to "
        "loopback), comma-separated; '*': any (DNS rebinding protection off)"))
    max_concurrent_requests: int = field(default=8, metadata=_help(
        "serve: generations served at once (each a session and a draft KV cache); more are answered 429"))
    request_timeout_s: float = field(default=60.0, metadata=_help(
        "serve: how long a request waits for a verifier to come online before 503 no_verifier; a request's own "
        "'timeout' (seconds) overrides it"))
    metrics_host: str = field(default="127.0.0.1", metadata=_help("serve: address of the Prometheus /metrics endpoint"))
    metrics_port: int = field(default=9465, metadata=_help("serve: port of the Prometheus /metrics endpoint; 0: off"))
    log_level: str = field(default="warning", metadata=_help("debug, info, warning or error"))

    def __post_init__(self) -> None:
        if not self.device_id:
            object.__setattr__(self, "device_id", socket.gethostname().split(".")[0] or "edge")
        require(Path(self.draft, "model.onnx").is_file(), f"draft {self.draft!r} has no model.onnx")
        require(Path(self.draft, "tokenizer.json").is_file(), f"draft {self.draft!r} has no tokenizer.json")
        self.check_broker(self.log_level, device_id=self.device_id, verifier_id=self.verifier)
        require(self.draft_tokens >= 0, "draft_tokens must be >= 0")
        # The wire's limits (what a verifier accepts by default; each announces its own, and k is capped by it).
        require(1 <= self.proposal_tokens <= Limits.max_proposal_tokens,
                f"proposal_tokens must be 1..{Limits.max_proposal_tokens}")
        require(1 <= self.k_max <= Limits.max_draft_tokens, f"k_max must be 1..{Limits.max_draft_tokens}")
        for name in ("timeout_s", "outage_timeout_s", "discovery_timeout_s", "request_timeout_s"):
            require_duration(getattr(self, name), name)
        require(self.retries >= 0, "retries must be >= 0")
        require(self.threads >= 1, "threads must be >= 1")
        from sled_edge.providers import ProviderUnavailable, resolve_provider

        try:
            resolve_provider(self.provider)
        except ProviderUnavailable as exc:
            raise ConfigError(str(exc)) from None
        require(0 < self.http_port < 65536 and 0 <= self.metrics_port < 65536, "ports must be 1..65535 (metrics: 0 = off)")
        require(self.default_max_tokens >= 1, "default_max_tokens must be >= 1")
        require(self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1")
        require(self.api_key == self.api_key.strip() and all(" " < c < "\x7f" for c in self.api_key),
                "api_key must be printable ASCII without spaces (it travels in an HTTP header)")
        if not self.model_name:
            object.__setattr__(self, "model_name", f"sled-{Path(self.draft).resolve().name}")
