"""``sled-edge serve``: an OpenAI-compatible HTTP API on the device's loopback, so any OpenAI client
(or app) on the device talks to the shared verifier through this device's draft model.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions; ``stream: true`` answers
with server-sent events. Parameters: max_tokens, temperature (OpenAI's default 1.0: exact sampling),
top_p, top_k (extension), seed, stop. Each request is its own session; concurrent requests are
concurrent sessions on the one broker connection. Chat messages are laid out by the model's own chat
template (``sled_edge.chat_template``), or as plain "role: content" lines for a tokenizer without one.

Every answer carries its speculative decoding figures: in ``usage`` under vLLM's names (num_drafts,
num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos, mean_acceptance_length,
draft_acceptance_rate; a stream sends ``usage`` in its final chunk), and in ``sled`` the rounds, mean
accepted length, acceptance rate, proactive rounds, verifier, seed and the prompt format used.

Text leaves special tokens (an EOS such as ``<|im_end|>``) out, as vLLM's ``skip_special_tokens`` does by
default; a request may keep them with ``"skip_special_tokens": false``. A request that arrives while no
verifier is online waits for one up to its deadline (``--request-timeout-s``, or its own ``"timeout"`` in
seconds) before it is answered 503 no_verifier: a verifier loading its target comes online meanwhile.

What may come in at all (a bearer token, JSON bodies, the Host header, a cap on concurrent generations) is
``sled_edge.api_guard``'s; a chat template renders in a worker thread under a time limit.

Errors are OpenAI-shaped JSON: 400 only for a request that is wrong (bad JSON or parameters, a prompt
that encodes to nothing or fills the verifier's context); 401, 415, 429 from the guard; 503 when no
verifier can serve it now; 500, logged with its traceback, for anything that fails on our side.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, replace

import structlog
from aiohttp import web

from sled_edge.api_guard import ApiGuard, allowed_hosts
from sled_edge.chat_template import RENDER_TIMEOUT_S, ChatFormat, ChatTemplateError, load_chat_format
from sled_edge.client import EdgeDevice, EdgeError
from sled_protocol import ProtocolError, SamplingParams
from sled_protocol.config import ConfigError
from sled_protocol.types import is_integer, is_number

log = structlog.get_logger("sled_edge")

REQUEST_ERRORS = ("too_large",)  # EdgeError codes that mean the request itself cannot be served: 400
# OpenAI's documented temperature range, which its clients expect an OpenAI-compatible API to enforce; the
# system samples exactly at any temperature SamplingParams accepts (up to 100, as the CLI and the wire do).
OPENAI_MAX_TEMPERATURE = 2
# OpenAI's error types by status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 415: "invalid_request_error",
               429: "rate_limit_error"}
MAX_TIMEOUT_S = 3600  # a request's own "timeout": the longest it may wait for a verifier


class BadRequest(ValueError):
    pass


def chat_format_of(draft_dir: str) -> ChatFormat:
    """The draft's tokenizer's chat format (its tokenizer is the target's); a broken template is a configuration
    error, found at start rather than at the first chat request."""
    try:
        chat_format = load_chat_format(draft_dir)
    except (ChatTemplateError, ValueError) as exc:
        raise ConfigError(f"chat template of {draft_dir}: {exc}") from None
    log.info("chat_format", prompt_format=chat_format.name)
    return chat_format


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    max_tokens: int
    sampling: SamplingParams | None
    stop: tuple[str, ...]
    stream: bool
    prompt_format: str = "completion"  # chat: "chat_template" or "plain"
    add_special_tokens: bool = True    # False for a chat template's text, which holds them already
    skip_special_tokens: bool = True   # leave special tokens (an EOS) out of the text, as vLLM does
    timeout_s: float | None = None     # the request's own deadline for a verifier; None: the server's
    messages: tuple[dict, ...] = ()    # chat: rendered into ``prompt`` by ``render_chat``


def parse_request(body: object, chat: bool, default_max_tokens: int) -> CompletionRequest:
    """The request as sent, checked; a chat request's prompt is rendered afterwards (``render_chat``)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages: list = []
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        prompt = ""
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    temperature, top_p, top_k = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", 0)
    seed, stop = body.get("seed"), body.get("stop") or ()
    if not is_integer(max_tokens) or not 1 <= max_tokens <= 100_000:
        raise BadRequest("'max_tokens' must be a positive integer")
    if is_number(temperature) and temperature > OPENAI_MAX_TEMPERATURE:
        raise BadRequest(f"'temperature' must be in [0, {OPENAI_MAX_TEMPERATURE}]")
    seed = seed if seed is not None else secrets.randbelow(2**31)
    try:  # the ranges of temperature, top_p, top_k and seed live in SamplingParams, and only there
        sampling = SamplingParams(temperature, top_k, top_p, seed)
    except ProtocolError as exc:
        raise BadRequest(str(exc)) from None
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    skip_special_tokens, timeout_s = body.get("skip_special_tokens", True), body.get("timeout")
    if not isinstance(skip_special_tokens, bool):
        raise BadRequest("'skip_special_tokens' must be true or false")
    if timeout_s is not None and not (is_number(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise BadRequest(f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return CompletionRequest(prompt, max_tokens, None if sampling.greedy else sampling,  # 0 or ~0: greedy
                             tuple(stop), bool(body.get("stream", False)), skip_special_tokens=skip_special_tokens,
                             timeout_s=timeout_s, messages=tuple(messages))


async def render_chat(request: CompletionRequest, chat_format: ChatFormat,
                      timeout_s: float = RENDER_TIMEOUT_S) -> CompletionRequest:
    """A chat request with its messages laid out by the model's chat template, rendered in a worker thread
    (a long conversation never stalls the event loop) that stops itself after ``timeout_s`` (a 400)."""
    try:
        rendered = await asyncio.to_thread(chat_format.render, list(request.messages), timeout_s=timeout_s)
    except ChatTemplateError as exc:
        raise BadRequest(str(exc)) from None
    return replace(request, prompt=rendered.text, prompt_format=rendered.prompt_format,
                   add_special_tokens=rendered.add_special_tokens)


class Api:
    def __init__(self, device: EdgeDevice, model_name: str, default_max_tokens: int = 128, metrics=None,
                 chat_format: ChatFormat | None = None, guard: ApiGuard | None = None,
                 request_timeout_s: float | None = None, template_timeout_s: float = RENDER_TIMEOUT_S) -> None:
        self.device = device
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics
        self.chat_format = chat_format or ChatFormat(None)
        # Loopback only and no cap unless told: what the tests' bare Api(device, name) gets.
        self.guard = guard or ApiGuard("", allowed_hosts("127.0.0.1"), 0)
        self.request_timeout_s = request_timeout_s  # None: the device's discovery_timeout_s
        self.template_timeout_s = template_timeout_s

    def app(self) -> web.Application:
        generating = ("/v1/completions", "/v1/chat/completions")
        guard = self.guard.middleware(self._guard_error, lambda request: request.path in generating)
        app = web.Application(client_max_size=1 << 20, middlewares=[guard])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", functools.partial(self.complete, chat=False))
        app.router.add_post("/v1/chat/completions", functools.partial(self.complete, chat=True))
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "device": self.device.config.device_id})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "sled"}]})

    def _count(self, endpoint: str, status: int) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _error(self, endpoint: str, status: int, message: str, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        self._count(endpoint, status)
        kind = ERROR_TYPES.get(status, "server_error")
        return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status,
                                 headers=headers)

    def _guard_error(self, status: int, message: str, code: str, headers: dict[str, str]) -> web.Response:
        return self._error("guard", status, message, code, headers)

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        try:
            parsed = parse_request(await request.json(), chat, self.default_max_tokens)
            if chat:
                parsed = await render_chat(parsed, self.chat_format, self.template_timeout_s)
        except ValueError as exc:  # BadRequest, JSONDecodeError, a body that is not UTF-8
            return self._error(endpoint, 400, str(exc))
        run: Generation | None = None
        if self.metrics is not None:
            self.metrics.active.inc()
        try:
            prompt_ids = encode(self.device, parsed)
            if not prompt_ids:
                raise BadRequest("the prompt encodes to no tokens")
            wait_s = parsed.timeout_s if parsed.timeout_s is not None else self.request_timeout_s
            run = Generation(self.device, parsed, chat, self.model_name, prompt_ids, verifier_wait_s=wait_s)
            response = await run.stream(request) if parsed.stream else web.json_response(await run.complete())
            self._count(endpoint, 200)
            return response
        except BadRequest as exc:
            return self._error(endpoint, 400, str(exc))
        except EdgeError as exc:
            return self._error(endpoint, 400 if exc.code in REQUEST_ERRORS else 503, str(exc), exc.code)
        except Exception as exc:  # ours, not the request's: log the cause, answer 500
            if run is not None and run.streaming:  # the stream is under way (its client left?): no status to send
                raise
            log.exception("request_failed", endpoint=endpoint)
            return self._error(endpoint, 500, f"internal error: {exc.__class__.__name__}: {exc}", "internal")
        finally:
            if self.metrics is not None:
                self.metrics.active.dec()


def encode(device: EdgeDevice, request: CompletionRequest) -> list[int]:
    if request.add_special_tokens:
        return device.encode_prompt(request.prompt)
    return device.encode_prompt(request.prompt, add_special_tokens=False)  # the chat template wrote them


class Generation:
    """One request: generate, stream text deltas, stop at a stop sequence, build OpenAI-shaped bodies."""

    def __init__(self, device: EdgeDevice, request: CompletionRequest, chat: bool, model: str,
                 prompt_ids: list[int] | None = None, verifier_wait_s: float | None = None) -> None:
        self.device, self.request, self.chat, self.model = device, request, chat, model
        self.prompt_ids = prompt_ids  # None: encoded when generating
        self.verifier_wait_s = verifier_wait_s  # how long to wait for a verifier; None: the device's default
        self.streaming = False  # headers sent: failures can only be reported inside the stream
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.tokens: list[int] = []
        self.text = ""      # committed text, cut at a stop sequence
        self.sent = 0       # characters already streamed
        self.stopped = False

    def _on_tokens(self, new_tokens: list[int]) -> bool:
        self.tokens.extend(new_tokens)
        text = self.device.decode(self.tokens, skip_special_tokens=self.request.skip_special_tokens)
        hits = [at for at in (text.find(stop) for stop in self.request.stop) if at >= 0]
        if hits:  # the earliest stop sequence wins, whatever its place in the list
            self.text, self.stopped = text[: min(hits)], True
            return True
        self.text = text
        return False

    def _ready_text(self) -> str:
        """Text safe to send: no split UTF-8 character, and no tail that may still become a stop sequence."""
        text = self.text
        if not self.stopped:
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.request.stop), default=0)
            text = text[: max(self.sent, len(text) - hold)]
        return text

    def _finish_reason(self, result) -> str:
        return "stop" if self.stopped or result.finish_reason == "eos" else "length"

    def _usage(self, result) -> dict:
        """OpenAI's token counts, then this request's acceptance under vLLM's names."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(result.token_ids),
                "total_tokens": self.prompt_tokens + len(result.token_ids), **result.spec_decode}

    def _sled(self, result) -> dict:
        # mean_accepted_length and proactive_rounds: the names before issue 23, kept beside the new for a release.
        return {"rounds": result.rounds, "mean_acceptance_length": result.mean_acceptance_length,
                "mean_accepted_length": result.mean_acceptance_length, "acceptance_rate": result.acceptance_rate,
                "guesses_held": result.guesses_held, "proactive_rounds": result.guesses_held,
                "verifier": result.verifier, "seed": result.seed, "prompt_format": self.request.prompt_format}

    async def complete(self) -> dict:
        result = await self._generate()
        choice = {"index": 0, "finish_reason": self._finish_reason(result), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self._usage(result),
                "sled": self._sled(result)}

    async def _generate(self, on_tokens=None):
        prompt_ids = self.prompt_ids if self.prompt_ids is not None else encode(self.device, self.request)
        self.prompt_tokens = len(prompt_ids)

        def observe(new_tokens: list[int]) -> bool:
            stop = self._on_tokens(new_tokens)
            if on_tokens is not None:
                on_tokens()
            return stop

        return await self.device.generate(prompt_ids, self.request.max_tokens, on_tokens=observe,
                                          sampling=self.request.sampling, verifier_wait_s=self.verifier_wait_s)

    def _chunk(self, delta: str | None, finish_reason: str | None, first: bool = False, result=None) -> bytes:
        """One event; the last one (``result`` given) carries ``usage`` and ``sled``, as vLLM's final chunk does."""
        if self.chat:
            body = {"index": 0, "delta": ({"role": "assistant", "content": ""} if first else
                                          ({"content": delta} if delta else {})), "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            body = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        payload = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [body]}
        if result is not None:
            payload["usage"], payload["sled"] = self._usage(result), self._sled(result)
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one chunk per verified round that added text, then the finish, then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.streaming = True
        await response.prepare(request)
        if self.chat:
            await response.write(self._chunk(None, None, first=True))
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

        def flush_ready() -> None:
            ready = self._ready_text()
            if len(ready) > self.sent:
                chunks.put_nowait(self._chunk(ready[self.sent :], None))
                self.sent = len(ready)

        async def produce():
            try:
                return await self._generate(on_tokens=flush_ready)
            finally:
                chunks.put_nowait(None)

        task = asyncio.create_task(produce(), name=f"generate-{self.id}")
        try:
            while (chunk := await chunks.get()) is not None:
                await response.write(chunk)
            try:
                result = await task
            except Exception as exc:  # headers are gone: report the failure in the stream itself
                if not isinstance(exc, EdgeError):
                    log.exception("request_failed", endpoint="stream")
                error = {"error": {"message": str(exc), "type": "server_error", "code": getattr(exc, "code", "internal")}}
                await response.write(f"data: {json.dumps(error)}\n\n".encode() + b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            if len(self.text) > self.sent:
                await response.write(self._chunk(self.text[self.sent :], None))
            await response.write(self._chunk(None, self._finish_reason(result), result=result))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            if not task.done():  # the client went away: stop generating for it
                task.cancel()
                await asyncio.wait([task])
