"""The ``compiled`` runtime: one readable forward for the Llama family over the KV slots, compilable.

The same weights as the ``transformers`` runtime (loaded by transformers; q/k/v and gate/up concatenated once
at load into one product each, ``fuse_projections``), but the forward is ours, in the spirit of gpt-fast:
embed, then per layer norm -> q/k/v -> rotary -> write the new keys and values into the rows' slots ->
attention -> o_proj -> MLP, then norm and the vocabulary projection. No
attention-mask construction, cache objects or keyword plumbing per call, and every shape is ours to fix.

Two ways to attend, chosen by ``compile``:

- eager (``compile="off"``, the default on CPU): the rows' tokens packed end to end as one sequence (as the
  transformers runtime packs them: no product runs over padding, though a step's rows are ragged, k = 0-8 as
  each device prices it), and each row attends over its own slot in place, over its own length
  (``PackedRows.attend``, shared with the transformers runtime). Shapes are the batch's own.
- static (any compile mode, the default on a GPU: ``reduce-overhead``, i.e. CUDA graphs): rows, tokens per
  row and attended width are padded up to a few buckets (powers of two), padding rows write into the spare
  slot and are never read, and attention is one SDPA over each row's slot read up to the bucketed width with
  a boolean mask. Every bucket is one static graph, captured once, replayed after.

A serving process sees many buckets (rows x tokens x width x KV capacity: hundreds over a long uptime), and
past dynamo's recompile limits a ``fullgraph`` function raises on every new shape. So the compiled shapes are
bounded (``ShapeBudget``: the first ``max_compiled_shapes`` buckets met, 64 by default, within dynamo's limits,
which are raised to fit): a bucket past the budget, or one dynamo refuses anyway, runs the same static forward
eagerly. A step never fails for its shape; ``shapes`` counts what was compiled and what ran eager.

Linear layers are batch-invariant in both (``sled_verifier.invariant``). Supported: Llama, Qwen2 and Mistral
without sliding windows (the family this project builds, and the Qwen2.5 targets of the paper); anything
else is refused at load with a pointer to ``--runtime transformers``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sled_verifier import native, tokenwise
from sled_verifier.config import COMPILE_MODES
from sled_verifier.invariant import make_batch_invariant
from sled_verifier.kvslots import SlotKV
from sled_verifier.target import (PackedGroups, PackedLogits, PackedRows, eos_ids_of, load_causal_lm, packed_plan,
                                  packed_weights, resolve_device)

SUPPORTED = ("llama", "qwen2", "mistral")
MAX_COMPILED_SHAPES = 64  # static graphs per target; later buckets run eagerly (dynamo's default limit is 8)


def bucket(n: int, smallest: int = 1) -> int:
    """The next power of two >= n (and >= smallest): few enough shapes to capture each once."""
    size = smallest
    while size < n:
        size *= 2
    return size


class ShapeBudget:
    """The static shapes compiled so far, at most ``limit``; a shape past it runs eagerly instead of compiling."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.compiled: set[tuple] = set()
        self.eager_steps = 0  # forwards that ran eagerly because their shape had no graph

    def admit(self, shape: tuple) -> bool:
        """True: run ``shape`` compiled (it has a graph, or the budget has room for one)."""
        if shape in self.compiled:
            return True
        if len(self.compiled) < self.limit:
            self.compiled.add(shape)
            return True
        self.eager_steps += 1
        return False

    def refused(self, shape: tuple) -> None:
        """Dynamo would not compile ``shape`` (its own limits, shared by every target in the process): compile
        nothing more; the graphs already built keep serving their shapes."""
        self.compiled.discard(shape)
        self.limit = len(self.compiled)
        self.eager_steps += 1


def static_shape(arguments: tuple, kv: SlotKV) -> tuple:
    """What a static forward's graph is specialised on: the bucketed rows, tokens and width, prefill or not,
    and the KV store's size (a grown store is new tensors of a new shape)."""
    input_ids, visible, last_only = arguments[0], arguments[5], arguments[6]
    return (*input_ids.shape, visible.shape[-1], last_only, kv.capacity, kv.length)


def fused(*linears: nn.Linear) -> nn.Linear:
    """One linear whose outputs are ``linears``' outputs side by side: one product streams all their weights
    (at a few rows on a CPU the product reads its weight at a fixed rate per call, and per-call costs add up)."""
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                    device="meta")
    out.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


def fuse_projections(model) -> None:
    """Per layer, q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (the originals are dropped: this
    forward is the only one that runs the model). Three products a layer where there were five: at 1-5 rows a
    SmolLM2 step's products took ~12% less time (one core)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = fused(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp.gate_up_proj = fused(mlp.gate_proj, mlp.up_proj)
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj


class CompiledTarget:
    name = "compiled"

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "float32", *,
                 compile: str = "auto", batch_invariant: bool = True,
                 max_compiled_shapes: int = MAX_COMPILED_SHAPES) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model_dir = Path(model_dir)
        model_type = json.loads((self.model_dir / "config.json").read_text()).get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"the compiled runtime serves {', '.join(SUPPORTED)} models, not {model_type!r}; "
                             "use --runtime transformers")
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; expected one of {', '.join(COMPILE_MODES)}")
        self.device = resolve_device(device)
        load_dtype, self.weights = packed_weights(dtype, self.device) if compile in ("auto", "off") else (dtype, None)
        self.model = load_causal_lm(self.model_dir, self.device, load_dtype)
        config = self.model.config
        self.vocab_size: int = config.vocab_size
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_ids = torch.tensor(eos_ids_of(self.model_dir), dtype=torch.int64, device=self.device)
        self.model_id = self.model_dir.name
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self._rotate = apply_rotary_pos_emb
        self.kv: SlotKV | None = None
        self.mode = ("reduce-overhead" if self.device.type == "cuda" else "off") if compile == "auto" else compile
        self.static = self.mode != "off"
        # Inductor lowers oneDNN's product over a reordered weight only where the weight is a frozen constant, so
        # a compiled forward keeps the BLAS's products (``sled_verifier.invariant``).
        products = "blas" if self.static else "auto"
        fuse_projections(self.model)
        self.batch_invariance = make_batch_invariant(self.model, self.device, products, weights=self.weights) \
            if batch_invariant or self.weights is not None else "off"
        self.width_invariant = batch_invariant  # block attention in the eager forward (``sled_verifier.attention``)
        self.per_token = not self.static and tokenwise.usable(self.model, self.device)  # native per-token work (eager)
        # every product and the attention native too: torch's operators run inline (``native.torch_inline``)
        self.native_forward = self.per_token and self.batch_invariance == "native" and self.width_invariant \
            and native.attends(self.head_dim)
        self.shapes = ShapeBudget(max_compiled_shapes)
        self._compiled = None
        if self.static:
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, max_compiled_shapes)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, max_compiled_shapes)
            self._compiled = torch.compile(self._forward_static, mode=None if self.mode == "default" else self.mode,
                                           dynamic=False, fullgraph=True)

    @property
    def packs_rows(self) -> bool:
        """The eager forward packs rows, so a step's prefill chunks ride in its verification forward
        (``forward_rows(logit_rows=)``); the static forward pads to its buckets and keeps them apart."""
        return not self.static

    def init_kv(self, max_slots: int, max_length: int) -> SlotKV:
        self.kv = SlotKV(self.model.config.num_hidden_layers, self.kv_heads, self.head_dim, self.model.dtype,
                         self.device, max_slots=max_slots, max_length=min(max_length, self.max_positions or max_length))
        return self.kv

    @torch.inference_mode()
    def forward_rows(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                     logits: bool = True, logit_rows: int | None = None,
                     packed_logits: bool = False) -> torch.Tensor | PackedLogits:
        """Logits ``[B, M, V]`` (``TargetRuntime.forward_rows``); ``logits=False`` projects one position per row;
        ``logit_rows=R`` (eager only: ``packs_rows``) the first R rows alone, ``[R, M_R, V]``; ``packed_logits``
        (eager only) as ``PackedLogits``, not copied into the padded rows."""
        if (logit_rows is not None or packed_logits) and self.static:
            raise ValueError("logit_rows and packed_logits need the eager forward (packs_rows)")
        arguments, rows, m_max = self.prepare(slots, starts, inputs, logits, logit_rows)
        if logit_rows is not None:
            rows, m_max = logit_rows, max(len(x) for x in inputs[:logit_rows])
        with native.torch_inline() if self.native_forward else contextlib.nullcontext():
            if packed_logits and logits:
                return self._forward_eager(*arguments, packed=True)
            return self._run(arguments)[:rows, : (m_max if logits else 1)]

    def _run(self, arguments: tuple) -> torch.Tensor:
        """The compiled graph of the arguments' bucket if the budget holds it, else the same forward eagerly."""
        if not self.static:
            return self._forward_eager(*arguments)
        if self._compiled is not None:
            shape = static_shape(arguments, self.kv)
            if self.shapes.admit(shape):
                try:
                    return self._compiled(*arguments)
                except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the graph runs: nothing written
                    self.shapes.refused(shape)
        return self._forward_static(*arguments)

    def prepare(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                logits: bool = True, logit_rows: int | None = None) -> tuple[tuple, int, int]:
        """The forward's tensors (padded to the buckets when static), the real row count and longest row. A
        static forward's arguments can be captured as a CUDA graph and replayed (bench/gpu_server.py)."""
        if self.kv is None:
            self.init_kv(max_slots=64, max_length=self.max_positions or 4096)
        rows, m_max = len(inputs), max(len(x) for x in inputs)
        if not self.static:  # the rows' tokens end to end: no product runs over padding (ragged k, prefill chunks)
            layout = self.kv.packed(slots, starts, inputs, self.device)
            plan, head_tokens, unpack = packed_plan(layout, slots, starts, inputs, self.device, self.width_invariant,
                                                    self.model.dtype, logit_rows)
            return (layout.input_ids, layout.positions, layout.write_slots, layout.write_positions, plan,
                    not logits, head_tokens, unpack), rows, m_max
        # Static: pad to the buckets; padding rows are one token written to the spare slot. Tokens per row are
        # bucketed up to the KV capacity at most (a context limit need not be a power of two, and padding queries
        # only write into the spare slot).
        rows_b, m_b = bucket(rows), min(bucket(m_max), self.kv.max_length)
        slots = [*slots] + [self.kv.trash] * (rows_b - rows)
        starts = [*starts] + [0] * (rows_b - rows)
        inputs = [*inputs] + [[0]] * (rows_b - rows)
        layout = self.kv.layout(slots, starts, inputs, m_b, self.device)                 # grows the store
        indices = (layout.input_ids, layout.positions, layout.write_slots, layout.write_positions)
        width_b = min(bucket(layout.width, 64), self.kv.length)
        keys = torch.arange(width_b, device=self.device)
        visible = keys[None, None, :] <= layout.positions[:, :, None]                               # [B, M, W]
        return (*indices, layout.slots, visible, not logits), rows, m_max

    def _layer(self, index: int, layer, hidden, cos, sin, write_slots, write_positions, attend) -> torch.Tensor:
        if self.per_token:
            return self._tokenwise_layer(index, layer, hidden, cos, sin, write_slots, write_positions, attend)
        batch, m = hidden.shape[:2]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q, k, v = attn.qkv_proj(x).split([self.heads * self.head_dim, *[self.kv_heads * self.head_dim] * 2], dim=-1)
        q = q.view(batch, m, self.heads, self.head_dim).transpose(1, 2)                     # [B, H, M, D]
        k = k.view(batch, m, self.kv_heads, self.head_dim).transpose(1, 2)                  # [B, Hkv, M, D]
        v = v.view(batch, m, self.kv_heads, self.head_dim)                                  # [B, M, Hkv, D]
        q, k = self._rotate(q, k, cos, sin)
        keys, values = self.kv.keys[index], self.kv.values[index]                           # [S+1, Hkv, L, D]
        keys[write_slots, :, write_positions] = k.transpose(1, 2)
        values[write_slots, :, write_positions] = v
        attended = attend(q, keys, values)                                                  # [B, M, H, D]
        hidden = hidden + attn.o_proj(attended.reshape(batch, m, self.heads * self.head_dim))
        mlp = layer.mlp
        gate, up = mlp.gate_up_proj(layer.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + mlp.down_proj(mlp.act_fn(gate) * up)

    def _tokenwise_layer(self, index: int, layer, hidden, cos, sin, write_slots, write_positions,
                         attend) -> torch.Tensor:
        """The same layer with its per-token work in native calls (``sled_verifier.tokenwise``)."""
        batch, m = hidden.shape[:2]
        attn, mlp = layer.self_attn, layer.mlp
        keys, values = self.kv.keys[index], self.kv.values[index]                           # [S+1, Hkv, L, D]
        qkv = attn.qkv_proj(tokenwise.rmsnorm(hidden, layer.input_layernorm))
        q, k, v = qkv.split([self.heads * self.head_dim, *[self.kv_heads * self.head_dim] * 2], dim=-1)
        tokenwise.rope_write(q, k, v, cos, sin, keys, values, write_slots, write_positions)  # q rotated in place
        q = q.view(batch, m, self.heads, self.head_dim).transpose(1, 2)                     # [B, H, M, D]
        attended = attend(q, keys, values)                                                  # [B, M, H, D]
        hidden = hidden + attn.o_proj(attended.reshape(batch, m, self.heads * self.head_dim))
        gate_up = mlp.gate_up_proj(tokenwise.rmsnorm(hidden, layer.post_attention_layernorm))
        return hidden + mlp.down_proj(tokenwise.silu_mul(gate_up))

    def _head(self, hidden: torch.Tensor, last_only: bool) -> torch.Tensor:
        if last_only:  # prefill: only the caches matter; project one position per row
            hidden = hidden[:, -1:]
        norm = self.model.model.norm
        return self.model.lm_head(tokenwise.rmsnorm(hidden, norm) if self.per_token else norm(hidden))

    def _forward_eager(self, input_ids, positions, write_slots, write_positions, plan: PackedRows | PackedGroups,
                       last_only: bool, head_tokens: int | None, unpack: torch.Tensor, packed: bool = False):
        """The rows packed as one sequence ``[1, T]`` (``kvslots.packed_layout``): every product, norm and rotary
        embedding runs over the T real tokens; attention unpacks each row (``PackedRows.attend``). Returns
        ``[B, M, V]`` (``unpack``: each padded place's token), the first ``head_tokens`` tokens' alone where set
        (``logit_rows``), or for prefill (``last_only``) one meaningless position per row, as the transformers
        runtime does: only the caches matter then."""
        body = self.model.model
        hidden = body.embed_tokens(input_ids)                                               # [1, T, E]
        cos, sin = body.rotary_emb(hidden, positions)

        def attend(q, keys, values):
            return plan.attend(q, keys, values, self.scaling)                               # [1, T, H, D]

        for index, layer in enumerate(body.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, write_slots, write_positions, attend)
        if last_only:
            return self._head(hidden, True).expand(unpack.shape[0], -1, -1)                 # [B, 1, V]
        if head_tokens is not None:
            hidden = hidden[:, :head_tokens]
        if packed:
            return PackedLogits(self._head(hidden, False)[0], unpack)
        return self._head(hidden, False)[0][unpack]                                         # [B, M, V]

    def _forward_static(self, input_ids, positions, write_slots, write_positions, slots, visible, last_only: bool):
        body = self.model.model
        hidden = body.embed_tokens(input_ids)
        cos, sin = body.rotary_emb(hidden, positions)
        width = visible.shape[-1]
        mask = visible[:, None]                                                             # [B, 1, M, W]

        def attend(q, keys, values):
            out = F.scaled_dot_product_attention(q, keys[slots, :, :width], values[slots, :, :width],
                                                 attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)   # [B, H, M, D]
            return out.transpose(1, 2)

        for index, layer in enumerate(body.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, write_slots, write_positions, attend)
        return self._head(hidden, last_only)
