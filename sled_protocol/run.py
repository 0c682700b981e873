"""Run an entry point's main coroutine until it ends or SIGINT/SIGTERM cancels it (systemd stops with SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


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
