"""Which onnxruntime execution provider drafts on this device: a short or full name, or ``auto``.

``auto`` takes the first of ``AUTO_ORDER`` that the installed onnxruntime wheel reports, else the CPU.
It never picks TensorRT, CoreML, OpenVINO, XNNPACK, QNN or NNAPI on its own: they compile for fixed
shapes, and a draft's shapes change every token (the context grows), so they rebuild or fall back and are
worth it only where someone has measured them; name them with ``--provider`` to use them.
"""

from __future__ import annotations

__all__ = ["SHORT_NAMES", "AUTO_ORDER", "ProviderUnavailable", "available_providers", "resolve_provider"]

SHORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
}
# GPUs that run a dynamic-shape decoder as exported; the CPU provider is the fallback of every wheel.
AUTO_ORDER = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
# Reported by every wheel but runs nothing locally.
_NOT_LOCAL = ("AzureExecutionProvider",)


class ProviderUnavailable(ValueError):
    """The provider asked for is not in this onnxruntime build; the message lists the ones that are."""


def available_providers() -> list[str]:
    import onnxruntime

    return [name for name in onnxruntime.get_available_providers() if name not in _NOT_LOCAL]


def resolve_provider(choice: str, available: list[str] | None = None) -> str:
    """The full provider name for ``choice`` (``auto``, a short name such as ``cuda``, or a full name)."""
    available = available_providers() if available is None else available
    wanted = choice.strip()
    if wanted.lower() == "auto":
        return next((name for name in AUTO_ORDER if name in available), "CPUExecutionProvider")
    full = SHORT_NAMES.get(wanted.lower(), wanted)
    if full not in available:
        short = {value: key for key, value in reversed(list(SHORT_NAMES.items()))}
        listed = ", ".join(f"{short.get(name, name)} ({name})" for name in available)
        raise ProviderUnavailable(
            f"execution provider {choice!r} is not available in this onnxruntime build; available: {listed}, "
            "or auto. A GPU needs its own wheel (onnxruntime-gpu, onnxruntime-openvino; see the README)"
        )
    return full
