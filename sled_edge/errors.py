"""The edge's one failure type: a generation that cannot go on."""

from __future__ import annotations

__all__ = ["EdgeError"]


class EdgeError(RuntimeError):
    """A generation that cannot go on; ``code`` is the verifier's error code or one of ours."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message
