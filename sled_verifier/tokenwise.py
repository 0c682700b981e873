"""The compiled runtime's per-token work between products, one native call each (``csrc/elementwise.c``).

At the few rows of a verification step a SmolLM2 layer spent more time in torch's operators between its
products (an RMS norm is ~8 operators, the rotary embedding ~12, the KV write 2 index puts, SiLU x up 2) than
in their arithmetic: ~200 operators a layer, a quarter of a 1x5 step on one core. Here each is one C call.
Each output depends on its own token alone, so the forward stays batch and width invariant; its bits differ
from torch's operators' (by float rounding: tests/test_runtime.py holds both runtimes within 1e-5).

Used on a CPU in float32 with the native library built, for a model whose MLP is SiLU-gated and whose norms
are RMS norms (the Llama family): all of it by the eager forward of ``sled_verifier.compiled``; the norms, the
MLP, and (with slot attention) the rotary embedding with the KV write by the transformers runtime
(``route_modules``); otherwise torch's operators. The rotary embedding is transformers' arithmetic exactly (no
fused multiply-add), so the transformers runtime's attention gives the bits of its own operators.
"""

from __future__ import annotations

import types

import torch

from sled_verifier import native
from sled_verifier.invariant import fuse_native
from sled_verifier.kvslots import BatchView
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
ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")  # q/k/v products, Llama's rotary, o


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple, attention_mask,
                      past_key_values=None, cache_position=None, **kwargs):
    """The Llama family's attention forward with the rotary embedding and the KV write in one native call
    (``rope_write``, transformers' own arithmetic: the same bits), where the cache is the verifier's slot view
    read in place (slot attention): at 1-5 rows those were ~20 of transformers' operators a layer. Any other call
    (generate, the gather fallback) takes the class's own forward."""
    if not (isinstance(past_key_values, BatchView) and past_key_values.in_place):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  past_key_values=past_key_values, cache_position=cache_position, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if self.sled_qkv is not None:  # one product (route_modules): views of its output
        q, k, v = self.sled_qkv(hidden_states).split(
            [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)  # [B, T, n D]
    keys, values, write_slots, write_positions = past_key_values.layer_writes(self.layer_idx)
    rope_write(q, k, v, *position_embeddings, keys, values, write_slots, write_positions)       # q rotated in place
    query = q.view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)                # [B, H, T, D]
    attended, weights = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation](
        self, query, keys, values, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(attended.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def route_modules(model) -> int:
    """The transformers runtime's share: the Llama family's RMS norms, SiLU-gated MLPs and attention through the
    native calls; returns the modules routed. Where the products are native, a layer's q/k/v and its gate/up are
    each one product (``invariant.fuse_native``: the same bits, one copy of the weights), as the compiled
    runtime's are; else they stay the modules' own linears."""
    routed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(lambda self, x: rmsnorm(x, self), module)
        elif kind in MLPS and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.sled_gate_up = fuse_native([module.gate_proj, module.up_proj])
            module.forward = types.MethodType(mlp_forward, module)
        elif kind in ATTENTIONS and all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            module.sled_qkv = fuse_native([module.q_proj, module.k_proj, module.v_proj])
            module.forward = types.MethodType(attention_forward, module)
        else:
            continue
        routed += 1
    return routed


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The Llama family's MLP: down(silu(gate(x)) * up(x)), gate/up one product where ``route_modules`` fused them."""
    if self.sled_gate_up is not None:
        return self.down_proj(silu_mul(self.sled_gate_up(x)))
    return self.down_proj(silu_mul_apart(self.gate_proj(x), self.up_proj(x)))


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, write_slots: torch.Tensor,
               write_positions: torch.Tensor) -> None:
    """Rotate each token's q (in place) and k by its position's ``cos``/``sin`` ``[B, M, D]``, write k and v into
    ``keys``/``values`` ``[S+1, Hkv, L, D]`` at (``write_slots``, ``write_positions``) ``[B, M]``. ``q``, ``k``,
    ``v``: ``[B, M, heads x D]`` each, views of one fused product's output or three products' (rows any stride
    apart, elements adjacent); ``q`` is written, so it must be a view."""
    cos, sin = cos.contiguous(), sin.contiguous()
    slots, positions = write_slots.contiguous(), write_positions.contiguous()
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise RuntimeError("the KV store must be contiguous")
    tokens, head_dim = slots.numel(), cos.shape[-1]
    if q.stride(-1) != 1:
        raise RuntimeError("q is rotated in place: its elements must be adjacent")
    q2 = q.view(tokens, q.shape[-1])  # a view: the rotation lands in q
    k2, v2 = (t.reshape(tokens, t.shape[-1]) for t in (k, v))  # views where the layout allows, else copies
    k2, v2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (k2, v2))
    native.function("sled_rope_write", P, I64, P, I64, P, I64, P, P, P, P, P, P, I64, I64, I64, I64, I64)(
        q2.data_ptr(), q2.stride(0), k2.data_ptr(), k2.stride(0), v2.data_ptr(), v2.stride(0), cos.data_ptr(),
        sin.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(), positions.data_ptr(), tokens,
        q2.shape[1] // head_dim, k2.shape[1] // head_dim, head_dim, keys.shape[2])
