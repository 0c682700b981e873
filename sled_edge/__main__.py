"""``sled-edge``: draft on this device, verify on the shared SLED verifier.

Exit status: 0 done, 65 the verifier refused our data, 69 no verifier available, 70 crash, 78 bad config.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Coroutine

import structlog

from sled_edge.config import EdgeConfig
from sled_protocol import ProtocolError, SamplingParams
from sled_protocol.config import ConfigError, add_config_arguments, bind_failed, config_from_args
from sled_protocol.exitcodes import EX_DATAERR, EX_UNAVAILABLE
from sled_protocol.run import run_main

log = structlog.get_logger("sled_edge")
# Failures of availability (exit 69: try again later), as opposed to refusals of our data (exit 65).
UNAVAILABLE = ("no_verifier", "verifier_timeout", "target_unavailable", "broker_unreachable", "connection_failed",
               "overloaded", "rate_limited")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sled-edge",
        description="SLED edge device: drafts tokens with a local ONNX model and has a shared verifier "
                    "check them, so the output is exactly the target model's.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate", help="generate a completion for one prompt",
        description="Generate a completion for one prompt, printing text as it is committed.",
        epilog="Example: sled-edge generate --draft models/build/tiny/drafts/rpi5 --prompt 'def main(' "
               "--max-new-tokens 64",
    )
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate [default 128]")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0: greedy, the target's argmax output [default]; > 0: sample exactly from the target")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    generate.add_argument("--seed", type=int, default=None,
                          help="sampling seed; the same seed reproduces the output [default: random, reported]")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object (token_ids, text, rounds, accepted_tokens, ...) at the end")
    add_config_arguments(generate, EdgeConfig)
    serve = commands.add_parser(
        "serve", help="run the device service: an OpenAI-compatible API on loopback (systemd runs this)",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (streaming with server-sent "
                    "events) on --http-host:--http-port; every request is a session drafted here and verified "
                    "by the shared verifier. Prometheus metrics on --metrics-port.",
        epilog="Example: sled-edge serve --draft models/build/family-quick/drafts/rpi5-int8 --device-id pi5 && "
               "curl localhost:8080/v1/completions -d '{\"prompt\": \"def main(\", \"max_tokens\": 32}'",
    )
    add_config_arguments(serve, EdgeConfig)
    return parser


async def run_serve(config: EdgeConfig) -> None:
    from aiohttp import web

    from sled_edge.api import Api, chat_format_of
    from sled_edge.api_guard import ApiGuard, allowed_hosts
    from sled_edge.client import EdgeDevice, EdgeError

    chat_format = chat_format_of(config.draft)  # the model's chat template, or plain
    metrics = None
    if config.metrics_port:
        from sled_edge.metrics import EdgeMetrics

        metrics = EdgeMetrics()
        try:
            port = metrics.serve(config.metrics_host, config.metrics_port)
        except OSError as exc:
            raise bind_failed("metrics", config.metrics_host, config.metrics_port, exc) from None
        log.info("metrics_serving", url=f"http://{config.metrics_host}:{port}/metrics")
    device = EdgeDevice(config, observer=metrics)
    guard = ApiGuard(config.api_key, allowed_hosts(config.http_host, config.allowed_hosts),
                     config.max_concurrent_requests)
    api = Api(device, config.model_name, config.default_max_tokens, metrics, chat_format, guard,
              request_timeout_s=config.request_timeout_s)
    # handler_cancellation: a request whose client went away stops generating for it.
    runner = web.AppRunner(api.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        try:  # the port before the broker: a port in use is a configuration error, found at once
            await web.TCPSite(runner, config.http_host, config.http_port).start()
        except OSError as exc:
            raise bind_failed("the API", config.http_host, config.http_port, exc) from None
        async with device:
            try:  # say at start whether a verifier fits; without one, requests wait for it (a target loading)
                verifier = (await device.choose_verifier()).verifier_id
            except EdgeError as exc:
                log.warning("no_verifier_yet", error=str(exc), request_timeout_s=config.request_timeout_s)
                verifier = None
            log.warning("edge_serving", url=f"http://{config.http_host}:{config.http_port}/v1",
                        model=config.model_name, device_id=config.device_id, verifier=verifier,
                        api_key=bool(config.api_key), max_concurrent_requests=config.max_concurrent_requests)
            await device.wait_closed()
    finally:
        await runner.cleanup()


def sampling_from_args(args: argparse.Namespace) -> SamplingParams | None:
    """The command line's sampling, checked by SamplingParams (the one place its ranges live); None: greedy."""
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, seed)
    except ProtocolError as exc:
        raise ConfigError(f"sampling (--temperature, --top-k, --top-p, --seed): {exc}") from None
    return None if sampling.greedy else sampling  # 0, or too small to differ from greedy


async def run_generate(config: EdgeConfig, prompt: str, max_new_tokens: int, as_json: bool,
                       sampling: SamplingParams | None = None) -> dict:
    from sled_edge.client import EdgeDevice

    async with EdgeDevice(config) as device:
        prompt_ids = device.encode_prompt(prompt)
        committed: list[int] = []
        printed = 0

        def stream(new_tokens: list[int]) -> None:
            nonlocal printed
            committed.extend(new_tokens)
            text = device.decode(committed)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)

        result = await device.generate(prompt_ids, max_new_tokens, on_tokens=None if as_json else stream,
                                       sampling=sampling)
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        sys.stdout.write(result.text[printed:] + "\n")
        print(f"[{len(result.token_ids)} tokens, {result.rounds} rounds, mean acceptance length "
              f"{result.mean_acceptance_length:.2f}, acceptance {result.acceptance_rate:.0%}, "
              f"{result.as_dict()['tokens_per_s']} tokens/s, verifier {result.verifier}"
              f"{'' if result.seed is None else f', seed {result.seed}'}]", file=sys.stderr)
    return result.as_dict()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def configure() -> tuple[str, Coroutine]:
        config = config_from_args(EdgeConfig, args)
        if args.command == "serve":
            return config.log_level, run_serve(config)
        if args.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        sampling = sampling_from_args(args)
        return config.log_level, run_generate(config, args.prompt, args.max_new_tokens, args.json, sampling)

    def failed(exc: Exception) -> int | None:
        from sled_edge.client import EdgeError

        if not isinstance(exc, EdgeError):
            return None
        log.error("generation_failed", code=exc.code, error=str(exc))
        return EX_UNAVAILABLE if exc.code in UNAVAILABLE else EX_DATAERR

    return run_main(configure, log, "edge_crashed", failed)


if __name__ == "__main__":
    sys.exit(main())
