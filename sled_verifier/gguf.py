"""GGUF files as targets and draft sources: dequantized once into a cached float32 Hugging Face directory.

Everything that takes a model (``sled-verifier --target``, ``sled-models export-draft``, ``sled-models check``,
both verifier runtimes, the vocabulary hash) takes a directory with ``config.json``, weights and
``tokenizer.json``. A ``.gguf`` file is turned into one by transformers' own GGUF loader (``from_pretrained(dir,
gguf_file=...)``, with the ``gguf`` package; about two seconds for a 135M model) and ``save_pretrained`` of the
model (float32) and its tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``).
The directory is cached under ``$SLED_CACHE/gguf-hf/<stem>-<key>`` (default ``~/.cache/sled``), the key
covering the GGUF's resolved path, size and mtime, so a restart reuses it and a changed file is converted again.

What cannot be dequantized is refused by name before anything is converted (``GGUFRefused``, a ``ValueError``:
exit 78 from the commands): an architecture transformers has no GGUF mapping for, or a tensor type the ``gguf``
package cannot dequantize (e.g. Q8_K, Q1_0).

One fix-up: a GGUF's tokenizer may name another token as ``eos_token`` than the model's ``eos_token_id``
(SmolLM2's reads ``<|im_start|>`` while the model stops on id 2, ``<|im_end|>``). Generation, the verifier and
the device stop on the configuration's id; the converted tokenizer's ``eos_token`` is set to that id's token so
that a chat template that writes ``eos_token`` writes the token the model ends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

__all__ = ["GGUFRefused", "check_dequantizable", "hf_directory", "is_gguf", "model_directory", "sled_cache_dir"]

CONVERSION_FORMAT = 1  # bump when the conversion's output changes: old cache entries are then ignored
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


class GGUFRefused(ValueError):
    """A GGUF file this project cannot turn into a float model, with the reason by name."""


def sled_cache_dir() -> Path:
    """``$SLED_CACHE``, else ``$XDG_CACHE_HOME/sled``, else ``~/.cache/sled``."""
    if os.environ.get("SLED_CACHE"):
        return Path(os.environ["SLED_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sled"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def check_dequantizable(path: Path) -> str:
    """The GGUF's architecture, or ``GGUFRefused`` naming what stands in the way."""
    import gguf
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise GGUFRefused(f"{path}: not a readable GGUF file ({exc})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFRefused(f"{path}: no general.architecture in the GGUF metadata")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are sections
    known = {name.replace("_", "") for name in supported} | set(supported)
    if architecture not in known and architecture.replace("_", "") not in known:
        raise GGUFRefused(f"{path}: architecture {architecture!r} cannot be loaded from GGUF by transformers "
                          f"(supported: {', '.join(supported)})")
    dequantizable = set(FLOAT_TYPES) | {kind.name for kind in _type_traits}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in dequantizable:
            raise GGUFRefused(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf package "
                              f"cannot dequantize (dequantizable: {', '.join(sorted(dequantizable))})")
    return architecture


def hf_directory(gguf_path: str | Path, cache: Path | None = None, log=None) -> Path:
    """The float32 Hugging Face directory of ``gguf_path``, converted on first use and cached."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} not found")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERSION_FORMAT}".encode())
    out = (cache or sled_cache_dir()) / "gguf-hf" / f"{gguf_path.stem}-{key.hexdigest()[:16]}"
    if (out / "sled-source.json").is_file():
        return out
    architecture = check_dequantizable(gguf_path)
    if log is not None:
        log(f"dequantizing {gguf_path.name} ({architecture}) to a float32 directory, once: {out}")
    partial = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    _convert(gguf_path, partial)
    (partial / "sled-source.json").write_text(json.dumps({"gguf": str(gguf_path), "size": stat.st_size,
                                                          "mtime_ns": stat.st_mtime_ns, "architecture": architecture,
                                                          "format": CONVERSION_FORMAT}))
    try:
        partial.rename(out)
    except OSError:  # another process converted it meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its notes on GGUF tokenizer classes; the progress bar stays
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFRefused(f"{gguf_path}: transformers cannot load it: {exc}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else model.config.eos_token_id
    eos_id = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_directory(path: str | Path, log=None) -> Path:
    """A Hugging Face model directory for ``path``: itself, or a GGUF file's cached conversion."""
    return hf_directory(path, log=log) if is_gguf(path) else Path(path)
