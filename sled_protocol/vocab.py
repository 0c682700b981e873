"""A short hash of a tokenizer's vocabulary: edges and verifiers must agree on it token for token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def vocab_hash(model_dir: str | Path) -> str:
    """sha256 over the sorted (token, id) pairs of ``model_dir/tokenizer.json``, first 16 hex digits."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a fast tokenizer (tokenizer.json) must sit beside the model")
    vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
