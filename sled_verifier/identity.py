"""The identity of the exact target a verifier serves: a short hash over its configuration and weights.

Edges pin every session to the identity of the target it opened on and move it only to a verifier that
announces the same one (ARCHITECTURE.md, failover): a shared tokenizer (Qwen2.5-1.5B and -7B) is not a
shared model. The identity covers ``config.json``, ``generation_config.json`` when present (both parsed,
minus the keys that only record where or with which library version they were saved), the bytes of
every ``*.safetensors`` / ``*.bin`` file (by name within the directory) and the dtype the weights are
run in. The directory's own name and path are no part of it: a renamed or copied target keeps its
identity; one changed weight changes it.

Hashing a 7B target reads ~15 GB, so the content digest is computed once and cached outside the model
directory (which is often read-only): ``$XDG_CACHE_HOME/sled/target-identity/`` (default
``~/.cache/sled/target-identity/``), one small JSON file per resolved directory path, valid while every
hashed file keeps its name, size and mtime. A restart then costs one ``stat`` per file. The cache is an
optimisation only: an unreadable or unwritable cache means hashing again, never a failure.

A GGUF target (a single ``.gguf`` file) is identified by that file's bytes (its name is no part of it) and
the dtype it is run in, cached the same way by its resolved path, size and mtime. Its float32 conversion
(``sled_verifier.gguf``) is derived from it and not hashed again; served as a directory of its own, the
conversion is a different identity (conservative: sessions never move between the two).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["content_digest", "default_cache_dir", "hashed_files", "target_identity"]

CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Keys that say how or where a configuration was saved, not what the model computes.
PROVENANCE_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sled" / "target-identity"


def hashed_files(model_dir: Path) -> list[Path]:
    """The files the identity covers: configuration first, then the weights by name; a GGUF file alone."""
    if model_dir.is_file() and model_dir.suffix.lower() == ".gguf":
        return [model_dir]
    configs = [model_dir / name for name in CONFIG_FILES if (model_dir / name).is_file()]
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"{model_dir} holds no weights (*.safetensors or *.bin) to identify the target by")
    return configs + weights


def content_digest(files: list[Path]) -> str:
    """sha256 over each file's name and content digest (configurations canonicalised), in the given order."""
    outer = hashlib.sha256()
    for path in files:
        if path.name in CONFIG_FILES:
            config = {k: v for k, v in json.loads(path.read_text()).items() if k not in PROVENANCE_KEYS}
            inner = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        else:
            with path.open("rb") as stream:
                inner = hashlib.file_digest(stream, "sha256").hexdigest()
        name = "model.gguf" if path.suffix.lower() == ".gguf" else path.name  # a renamed GGUF keeps its identity
        outer.update(f"{name}\0{inner}\n".encode())
    return outer.hexdigest()


def target_identity(model_dir: str | Path, dtype: str, cache_dir: Path | None = None) -> str:
    """16 hex digits naming the exact target in ``model_dir`` (or a .gguf file) run in ``dtype`` (see the module
    docstring)."""
    model_dir = Path(model_dir).resolve()
    files = hashed_files(model_dir)
    stamps = [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files]
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    cache_file = cache_dir / f"{hashlib.sha256(str(model_dir).encode()).hexdigest()[:24]}.json"
    digest = _cached(cache_file, stamps)
    if digest is None:
        digest = content_digest(files)
        _store(cache_file, {"format": CACHE_FORMAT, "dir": str(model_dir), "files": stamps, "digest": digest})
    return hashlib.sha256(f"{digest}\0{dtype}".encode()).hexdigest()[:16]


def _cached(cache_file: Path, stamps: list) -> str | None:
    try:
        entry = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT and entry.get("files") == stamps
    return entry.get("digest") if valid and isinstance(entry.get("digest"), str) else None


def _store(cache_file: Path, entry: dict) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entry))
        partial.replace(cache_file)  # atomic: a concurrent verifier never reads half an entry
    except OSError:
        pass  # a read-only home: hash again next start
