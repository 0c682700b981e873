"""Where the device's sessions may go: the verifiers' retained statuses, as the connection last heard them, and
the choice among them (``sled_edge.placement``, pure) made when one fits or after waiting ``discovery_timeout_s``
for one to come online.

A session opens on the least loaded verifier with our vocabulary (or the configured one) that can hold its
context; once open it moves only to a verifier announcing its target (see placement). ``move`` also offers the
session's own verifier back when no other fits, so a lone verifier is retried rather than given up on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from sled_edge.connection import EdgeConnection
from sled_edge.errors import EdgeError
from sled_edge.placement import Placement, choose, describe
from sled_edge.session import EdgeSession
from sled_protocol import Status

__all__ = ["VerifierDirectory"]


class VerifierDirectory:
    def __init__(self, connection: EdgeConnection, vocab: str, only: str = "",
                 discovery_timeout_s: float = 5.0) -> None:
        self.connection = connection
        self.statuses = connection.statuses  # verifier id -> its latest Status; the connection keeps it current
        self.vocab = vocab
        self.only = only  # a configured verifier id; empty: any
        self.discovery_timeout_s = discovery_timeout_s

    def get(self, verifier_id: str) -> Status | None:
        return self.statuses.get(verifier_id)

    async def choose(self, exclude: str | None = None, min_context: int = 0,
                     session: EdgeSession | None = None, timeout_s: float | None = None) -> Status:
        """The least loaded online verifier whose vocabulary is ours (or the configured one), not ``exclude``,
        that can hold ``min_context`` tokens and, for an open ``session``, serves the very target the session
        opened on. Waits up to ``timeout_s`` (default ``discovery_timeout_s``; an API request passes what is
        left of its own deadline) for one; EdgeError when none came."""
        need = self._placement(exclude, min_context, session)
        waited_s = self.discovery_timeout_s if timeout_s is None else timeout_s
        chosen = await self._await_status(lambda: choose(self.statuses.values(), need), waited_s)
        if chosen is None:
            raise self._unplaced(need, session, waited_s)
        return chosen

    async def move(self, session: EdgeSession, current: Status) -> tuple[Status, EdgeError | None]:
        """Where ``session`` should go from ``current``: another verifier serving its target, else ``current`` with
        the refusal saying why: at once while ``current`` is online for the session's target (a lone verifier is
        retried without waiting out discovery), else once it comes back or ``discovery_timeout_s`` has passed."""
        need = self._placement(current.verifier_id, session.max_len, session)

        def other_or_ours_back() -> Status | None:
            ours = self.statuses.get(current.verifier_id)
            ours_ok = ours is not None and ours.online and ours.target == session.target
            return choose(self.statuses.values(), need) or (ours if ours_ok else None)

        chosen = await self._await_status(other_or_ours_back)
        if chosen is None or chosen.verifier_id == current.verifier_id:
            return current, self._unplaced(need, session)
        return chosen, None

    def _placement(self, exclude: str | None, min_context: int, session: EdgeSession | None) -> Placement:
        return Placement(self.vocab, min_context, self.only, exclude, pinned=session is not None,
                         target=session.target if session is not None else None)

    def _unplaced(self, need: Placement, session: EdgeSession | None, waited_s: float | None = None) -> EdgeError:
        """Why no verifier fits ``need`` (after waiting ``waited_s``, default ``discovery_timeout_s``, for one)."""
        waited_s = self.discovery_timeout_s if waited_s is None else waited_s
        seen = describe(self.statuses.values())
        if session is not None and choose(self.statuses.values(), replace(need, pinned=False)):
            return EdgeError("target_unavailable", f"session {session.session_id} is pinned to target "
                             f"{session.target or '(none announced)'} (it was on {need.exclude}) and no other verifier "
                             f"serving that target came online within {waited_s:g} s; available: {seen}")
        wanted = f"verifier {self.only!r}" if self.only else "verifier"
        return EdgeError("no_verifier", f"found no {wanted} with vocabulary {self.vocab} within "
                         f"{waited_s:g} s; seen: {seen}")

    async def _await_status(self, pick: Callable[[], Status | None],
                            timeout_s: float | None = None) -> Status | None:
        """``pick()`` re-evaluated on every status change until it finds one, or None after ``timeout_s``
        (default ``discovery_timeout_s``)."""
        changed = self.connection.status_changed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.discovery_timeout_s if timeout_s is None else timeout_s)
        while (chosen := pick()) is None and loop.time() < deadline:
            changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await changed.wait()
            except TimeoutError:
                pass
        return chosen
