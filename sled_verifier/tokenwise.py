"""The compiled runtime's per-token work between products, one native call each (``csrc/elementwise.c``).

At the few rows of a verification step a SmolLM2 layer spent more time in torch's operators between its
products (an RMS norm is ~8 operators, the rotary embedding ~12, the KV write 2 index puts, SiLU x up 2) than
in their arithmetic: ~200 operators a layer, a quarter of a 1x5 step on one core. Here each is one C call.
Each output depends on its own token alone, so the forward stays batch and width invariant; its bits differ
from torch's operators' (by float rounding: tests/test_runtime.py holds both runtimes within 1e-5).

Used on a CPU in float32 with the native library built, for a model whose MLP is SiLU-gated and whose norms
are RMS norms (the Llama family): all of it by the eager forward of ``sled_verifier.compiled``; the norms and
the MLP by the transformers runtime (``route_modules``); otherwise torch's operators.
"""

from __future__ import annotations

import types

import torch

from sled_verifier import native
from sled_verifier.native import I64, P

F32 = native.ctypes.c_float


def usable(model, device: torch.device) -> bool:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (device.type == "cpu" and model.dtype == torch.float32 and native.available()
            and getattr(config, "hidden_act", "silu") == "silu" and head_dim <= 1024 and head_dim % 2 == 0)


def rmsnorm(x: torch.Tensor, norm) -> torch.Tensor:
    """``norm(x)`` for an RMS norm module (its ``weight``, ``variance_epsilon``): ``[..., dim]``."""
    x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    native.function("sled_rmsnorm", P, P, P, I64, I64, F32)(
        x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, norm.variance_epsilon)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused gate/up product's output ``[..., 2 * inter]``: ``[..., inter]``."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    _silu_mul()(gate_up.data_ptr(), gate_up.data_ptr() + 4 * inter, 2 * inter, out.data_ptr(), out.numel() // inter, inter)
    return out


def silu_mul_apart(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two products' outputs ``[..., inter]`` each."""
    gate, up = gate.contiguous(), up.contiguous()
    inter = gate.shape[-1]
    out = torch.empty_like(gate)
    _silu_mul()(gate.data_ptr(), up.data_ptr(), inter, out.data_ptr(), out.numel() // inter, inter)
    return out


def _silu_mul():
    return native.function("sled_silu_mul", P, P, I64, P, I64, I64)


NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # weight * x / rms(x): not Gemma's (1 + weight)
MLPS = ("LlamaMLP", "Qwen2MLP", "MistralMLP")               # down(act(gate(x)) * up(x))


def route_modules(model) -> int:
    """The transformers runtime's share: the Llama family's RMS norms and SiLU-gated MLPs (their products stay
    the modules' own linears) through the native calls. The rotary embedding and KV write stay transformers'
    (inside its attention); returns the modules routed."""
    routed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(lambda self, x: rmsnorm(x, self), module)
        elif kind in MLPS and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(
                lambda self, x: self.down_proj(silu_mul_apart(self.gate_proj(x), self.up_proj(x))), module)
        else:
            continue
        routed += 1
    return routed


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               write_slots: torch.Tensor, write_positions: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Rotate each token's q (in place, in ``qkv``) and k by its position's ``cos``/``sin`` ``[B, M, D]``, write
    k and v into ``keys``/``values`` ``[S+1, Hkv, L, D]`` at (``write_slots``, ``write_positions``) ``[B, M]``;
    returns ``qkv`` (contiguous, ``[B, M, (H + 2 Hkv) D]``)."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    slots, positions = write_slots.contiguous(), write_positions.contiguous()
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise RuntimeError("the KV store must be contiguous")
    tokens, head_dim = slots.numel(), cos.shape[-1]
    native.function("sled_rope_write", P, P, P, P, P, P, P, I64, I64, I64, I64, I64)(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(),
        positions.data_ptr(), tokens, heads, kv_heads, head_dim, keys.shape[2])
    return qkv
