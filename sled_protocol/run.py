"""Run an entry point's main coroutine until it ends or SIGINT/SIGTERM cancels it (systemd stops with SIGTERM),
and the one ``main`` runner both services share: configuration, logging and exit statuses (``run_main``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from sled_protocol.config import ConfigError
from sled_protocol.exitcodes import EX_CONFIG, EX_OK, EX_SOFTWARE
from sled_protocol.logs import configure_logging


def run_until_signal(main: Coroutine[Any, Any, Any]) -> bool:
    """True when the coroutine finished, False when a signal stopped it."""

    async def wrapper() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await main

    try:
        asyncio.run(wrapper())
    except asyncio.CancelledError:
        return False
    return True


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
