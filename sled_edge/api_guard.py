"""What the device API lets in, checked before any handler runs, as vLLM's and llama.cpp's servers do:

- an optional bearer token (``--api-key`` / ``SLED_API_KEY``): every ``/v1`` request carries
  ``Authorization: Bearer <key>``, compared in constant time, else 401;
- ``Content-Type: application/json`` on every POST, else 415: a web page open on the device can send
  ``text/plain`` (a "simple" request, no CORS preflight) to loopback, never JSON;
- the Host header names this server (DNS rebinding: a page of evil.example that re-resolves its name to
  127.0.0.1 still sends ``Host: evil.example``), else 400. Allowed by default: the bound address, and the
  loopback names when bound to loopback; bound to every address (0.0.0.0, ::), any IP literal and
  ``localhost``. ``--allowed-hosts`` lists more names (or ``*``: no check);
- at most ``--max-concurrent-requests`` generations at once (each one a session and a draft KV cache on a
  small device), the next answered 429 at once with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

__all__ = ["ApiGuard", "allowed_hosts", "host_allowed", "host_of"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
ANY_IP = "<any ip>"  # in an allowed set: any IP literal (bound to every address)

# error(status, message, code, headers) -> the OpenAI-shaped error response
ErrorResponse = Callable[[int, str, str, dict[str, str]], web.Response]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def host_of(header: str) -> str:
    """The host of a Host header, without its port, lower case, no trailing dot: ``[::1]:8080`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal: [addr] or [addr]:port
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def allowed_hosts(bound_host: str, configured: str = "") -> frozenset[str] | None:
    """The Host names the API answers when bound to ``bound_host``; None: any (``configured`` is ``*``)."""
    extra = {host_of(name) for name in configured.split(",") if name.strip()}
    if "*" in extra:
        return None
    bound = host_of(bound_host) if bound_host not in WILDCARDS else bound_host
    allowed = {bound} | extra
    if bound in WILDCARDS:
        allowed |= {"localhost", ANY_IP}
    elif _is_loopback(bound):
        allowed |= LOOPBACK_NAMES
    return frozenset(allowed - WILDCARDS)


def host_allowed(header: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a request with this Host header (None: none sent, which no browser does) may be served."""
    if allowed is None or header is None:
        return True
    host = host_of(header)
    return host in allowed or (ANY_IP in allowed and _is_ip(host))


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <api_key>``, compared in constant time (no timing oracle on the key)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


@dataclass
class ApiGuard:
    api_key: str                        # empty: no authentication
    hosts: frozenset[str] | None        # allowed_hosts(); None: any
    max_concurrent_requests: int        # generations at once; 0: no cap
    active: int = 0                     # generations now

    def middleware(self, error: ErrorResponse, generating: Callable[[web.Request], bool]):
        """An aiohttp middleware; ``generating(request)`` says which requests count against the cap."""

        @web.middleware
        async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
            if not host_allowed(request.headers.get("Host"), self.hosts):
                return error(400, f"host {request.headers.get('Host')!r} is not allowed (--allowed-hosts)",
                             "host_not_allowed", {})
            if self.api_key and request.path.startswith("/v1/") and not bearer_matches(
                    request.headers.get("Authorization"), self.api_key):
                return error(401, "a valid API key is required: Authorization: Bearer <key>", "invalid_api_key",
                             {"WWW-Authenticate": "Bearer"})
            if request.method == "POST" and request.content_type != "application/json":
                return error(415, f"Content-Type must be application/json, not {request.content_type!r}",
                             "unsupported_media_type", {})
            if not generating(request):
                return await handler(request)
            if self.max_concurrent_requests and self.active >= self.max_concurrent_requests:
                return error(429, f"{self.active} requests are being served, the most this device takes "
                             "(--max-concurrent-requests); retry later", "too_many_requests", {"Retry-After": "1"})
            self.active += 1
            try:
                return await handler(request)
            finally:
                self.active -= 1

        return guard
