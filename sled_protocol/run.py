"""Run an entry point's main coroutine until it ends or SIGINT/SIGTERM cancels it (systemd stops with SIGTERM),
and the one ``main`` runner both services share: configuration, logging and exit statuses (``run_main``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from sled_protocol.config import ConfigError
from sled_protocol.exitcodes import EX_CONFIG, EX_OK, EX_SOFTWARE
from sled_protocol.logs import configure_logging


STOP_GRACE_S = 10.0  # a stop's cancellation gets this long to unwind; then the process ends anyway


def run_until_signal(main: Coroutine[Any, Any, Any], grace_s: float = STOP_GRACE_S) -> bool:
    """True when the coroutine finished, False when a signal stopped it. A stop that has not unwound within
    ``grace_s`` ends the process there (status 0, as a stop), saying so: on this project's CI machine a verifier
    over TLS sometimes never finished unwinding its broker connection after SIGTERM (the main loop idle, no task
    left running our code), and ran on until the test's kill; systemd would have waited 90 s for its SIGKILL."""

    async def wrapper() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def stop() -> None:
            task.cancel()
            loop.call_later(grace_s, give_up, grace_s)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        await main

    try:
        asyncio.run(wrapper())
    except asyncio.CancelledError:
        return False
    return True


def give_up(grace_s: float) -> None:
    structlog.get_logger("sled_protocol").warning("stop_timed_out", grace_s=grace_s)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(EX_OK)


def run_main(configure: Callable[[], tuple[str, Coroutine[Any, Any, Any]]], log: Any, crashed: str,
             failed: Callable[[Exception], int | None] = lambda exc: None) -> int:
    """A service's ``main``: ``configure()`` reads its configuration and returns (log level, the coroutine to run
    until a signal). A ConfigError, read or found at start-up (a port in use, a model that does not load), is
    logged as ``bad_configuration``: EX_CONFIG. Another exception is ``failed``'s exit status when it knows it
    (and logs it), else a crash logged as ``crashed`` with its traceback: EX_SOFTWARE. Done or stopped: EX_OK."""
    try:
        log_level, main = configure()
    except ConfigError as exc:
        configure_logging()
        log.error("bad_configuration", error=str(exc))
        return EX_CONFIG
    configure_logging(log_level)
    try:
        run_until_signal(main)
    except ConfigError as exc:
        log.error("bad_configuration", error=str(exc))
        return EX_CONFIG
    except Exception as exc:  # noqa: BLE001 - the service's end: its status says why
        status = failed(exc)
        if status is None:
            log.exception(crashed)
            return EX_SOFTWARE
        return status
    return EX_OK
