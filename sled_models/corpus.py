"""The training corpus every machine has: the running Python's standard library sources.

Files are split into train and held-out by a hash of their relative path (not by position), so the
split is stable when files are added or removed. The corpus hash covers every file's path and bytes;
it goes into the manifest because a Debian system Python without its test suite gives a different,
smaller corpus than a full CPython build.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: tuple[Path, ...]
    held_out: tuple[Path, ...]
    sha256: str

    @property
    def train_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.train)


def _is_held_out(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def stdlib_corpus(root: Path | None = None, max_files: int = 0) -> Corpus:
    """``max_files`` > 0 keeps only that many (the smallest-path-first prefix): for smoke builds in tests."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if max_files:
        files = files[:max_files]
    digest = hashlib.sha256()
    train, held_out = [], []
    for path in files:
        relative = str(path.relative_to(root))
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
        (held_out if _is_held_out(relative) else train).append(path)
    return Corpus(root, tuple(train), tuple(held_out), digest.hexdigest()[:16])


def read_texts(paths: tuple[Path, ...]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]
