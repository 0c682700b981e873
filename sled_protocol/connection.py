"""The one reconnect loop both services run: connect, subscribe, serve, and on a lost connection back off
and connect again (to the next of a cluster's nodes), forever, with the same last will each time.

``Reconnecting.run(serve)`` calls ``serve(link)`` once per live connection; ``connected`` is set while a
link is up (after the subscriptions are in place) and ``link`` is that link. A ``TransportError`` from
``serve`` or from the transport (also inside an ExceptionGroup from a TaskGroup) restarts the
connection; so does any exception listed in ``restart_on`` (the edge lists ``Exception``: its connection
task supervises itself). Anything else propagates, and so does cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import structlog

from sled_protocol.transport import Link, Transport, TransportError, Will


def backoff_s(attempt: int, *, base_s: float = 0.2, cap_s: float = 10.0) -> float:
    """Reconnect delay after ``attempt`` consecutive failures: exponential, capped."""
    return min(cap_s, base_s * (2 ** min(attempt, 16)))


class Reconnecting:
    def __init__(self, transports: Sequence[Transport], identifier: str | Callable[[], str], *,
                 subscriptions: Sequence[tuple[str, int]] = (), will: Will | None = None,
                 restart_on: tuple[type[Exception], ...] = (TransportError,), log=None) -> None:
        if not transports:
            raise ValueError("at least one broker is needed")
        self.transports = list(transports)
        self.identifier = identifier
        self.subscriptions = list(subscriptions)
        self.will = will
        self.restart_on = tuple({TransportError, *restart_on})
        self.log = log if log is not None else structlog.get_logger("sled_protocol")
        self.connected = asyncio.Event()
        self.link: Link | None = None
        self.connections = 0  # successful connections so far; every one after the first is a reconnect
        self.last_error: BaseException | None = None  # why the latest attempt failed (for start-up errors)
        self._served = False  # whether the current attempt got as far as serving

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    async def run(self, serve: Callable[[Link], Awaitable[None]]) -> NoReturn:
        attempt = failures = 0  # attempt: consecutive failures since the last live connection
        while True:
            transport = self.transports[failures % len(self.transports)]  # after a failure, the next node
            self._served = False
            try:
                await self._connect_and_serve(transport, serve)
                failure: BaseException = TransportError("the connection ended")  # serve returned: treat as lost
            except* self.restart_on as group:
                failure = group.exceptions[0]
                while isinstance(failure, BaseExceptionGroup):  # nested TaskGroups: name the first leaf
                    failure = failure.exceptions[0]
            if self._served:
                attempt = 0
            self.last_error = failure
            delay = backoff_s(attempt)
            attempt += 1
            failures += 1
            self._log_failure(transport, failure, delay)
            await asyncio.sleep(delay)

    async def _connect_and_serve(self, transport: Transport, serve: Callable[[Link], Awaitable[None]]) -> None:
        identifier = self.identifier() if callable(self.identifier) else self.identifier
        try:
            async with transport.connect(identifier, self.will) as link:
                for topic_filter, qos in self.subscriptions:
                    await link.subscribe(topic_filter, qos=qos)
                self.link = link
                self.connections += 1
                self._served = True
                self.connected.set()
                if self.connections > 1:
                    self.log.warning("broker_reconnected", broker=str(transport))
                await serve(link)
        finally:
            self.connected.clear()
            self.link = None

    def _log_failure(self, transport: Transport, failure: BaseException, delay_s: float) -> None:
        if isinstance(failure, TransportError):
            self.log.warning("broker_connection_lost", broker=str(transport), error=str(failure),
                             retry_in_s=round(delay_s, 2))
        else:  # an unexpected error the caller asked us to ride out: with its traceback
            self.log.error("broker_connection_failed", broker=str(transport), retry_in_s=round(delay_s, 2),
                           exc_info=failure)
