"""``sled-verifier``: serve one target model to every edge device on the broker.

Exit status: 0 on a signal, 78 for a bad configuration (systemd must not restart it), 70 on a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine

import structlog

from sled_protocol.config import ConfigError, add_config_arguments, bind_failed, config_from_args
from sled_protocol.logs import redacted_config
from sled_protocol.run import run_main
from sled_verifier.config import VerifierConfig, parse_memory

log = structlog.get_logger("sled_verifier")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sled-verifier",
        description="SLED verifier: batches draft tokens from many edge devices and verifies them with one "
                    "target model (speculative decoding, greedy or sampled; the output is the target's own), "
                    "answering each device on MQTT.",
        epilog="Example: sled-verifier --mqtt-url mqtt://127.0.0.1:1883 --target models/build/tiny/target "
               "(or --target SmolLM2-135M-Instruct.Q4_1.gguf: dequantized once into a cached float32 directory)",
    )
    add_config_arguments(parser, VerifierConfig)
    return parser


async def serve(config: VerifierConfig, ready: asyncio.Event | None = None) -> None:
    """Load the target (off the event loop) and serve until cancelled."""
    import torch

    from sled_protocol.vocab import vocab_hash
    from sled_verifier.engine import KVBudgetError, Quotas, VerifierEngine
    from sled_verifier import native
    from sled_verifier.gguf import model_directory
    from sled_verifier.identity import target_identity
    from sled_verifier.price import StepTable
    from sled_verifier.service import VerifierService
    from sled_verifier.stats import VerifierStats
    from sled_verifier.runtime import load_target

    if config.threads:
        torch.set_num_threads(config.threads)
    stats, engine = VerifierStats(), None
    if config.metrics_port:  # bound before the target loads: a port in use fails at once, not after the load
        from sled_verifier.metrics import serve_metrics

        try:
            port = serve_metrics(stats, lambda: engine.session_count if engine is not None else 0,
                                 config.metrics_host, config.metrics_port)
        except OSError as exc:
            raise bind_failed("metrics", config.metrics_host, config.metrics_port, exc) from None
        log.info("metrics_serving", url=f"http://{config.metrics_host}:{port}/metrics")
    try:
        target = await asyncio.to_thread(load_target, config.target, config.runtime, config.device, config.dtype,
                                         device_map=config.device_map, compile=config.compile,
                                         batch_invariant=config.batch_invariant)
    except (ValueError, OSError) as exc:  # not a loadable causal LM: a configuration problem, not a crash
        raise ConfigError(f"cannot load target {config.target!r}: {exc}") from None
    vocab = vocab_hash(model_directory(config.target))  # a .gguf target: its converted tokenizer
    identity = await asyncio.to_thread(target_identity, config.target, config.dtype)  # cached after the first start
    log.info("target_loaded", model=target.model_id, target=identity, runtime=target.name,
             batch_invariance=target.batch_invariance,
             products=f"native {native.bf16_products()}, bfloat16 weights" if target.weights is not None else None,
             device=str(target.device), vocab=vocab,
             vocab_size=target.vocab_size, threads=torch.get_num_threads(), config=redacted_config(config))
    budget = parse_memory(config.kv_memory, free_bytes=free_memory_bytes(target.device))
    try:
        engine = await asyncio.to_thread(VerifierEngine, target, config.verifier_id, config.max_sessions, stats,
                                         config.max_context_tokens, Quotas.from_config(config), budget)
    except KVBudgetError as exc:
        raise ConfigError(str(exc)) from None
    log.info("kv_reserved", budget_bytes=budget, kv_memory=config.kv_memory, slots=engine.kv.max_slots,
             max_length=engine.kv.max_length, bytes_per_token=engine.kv.bytes_per_token(),
             sessions=engine.sessions.max_sessions, device_max_sessions=config.device_max_sessions)
    service = VerifierService(config, engine, vocab, identity)
    samples = await asyncio.to_thread(engine.calibrate)
    for drafts, tokens, seconds in samples:
        service.cost.observe(drafts, tokens, seconds)
    service.pricing.table = table = StepTable.from_samples(samples)
    log.info("step_cost_calibrated", samples=[(d, t, round(1000 * s, 2)) for d, t, s in samples],
             coef=[round(c, 6) for c in service.cost.coef],  # a scored token's price (ms) at each load timed, k = 1:
             token_ms_by_drafts=table and {d: round(1000 * table.price(d, 2)[2], 3) for d in table.drafts})
    await service.run(ready)


def free_memory_bytes(device) -> int:
    """Memory the KV store may draw on: a GPU's free memory, else the machine's available memory."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def configure() -> tuple[str, Coroutine]:
        config = config_from_args(VerifierConfig, args)  # checks the CA file too
        return config.log_level, serve(config)

    return run_main(configure, log, "verifier_crashed")


if __name__ == "__main__":
    sys.exit(main())
