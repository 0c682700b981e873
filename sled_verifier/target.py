"""The target model: any Hugging Face causal LM from a local directory, scored over ragged batches.

Every session's KV cache lives in a slot of one preallocated ``SlotKV`` (``sled_verifier.kvslots``).
A forward takes rows (slot, start, tokens): each row's tokens are appended at its own offset, with explicit
position ids. Sessions with different context lengths and draft lengths share ONE forward, and each row's
logits are those of scoring it alone. With slot attention the rows' tokens go end to end as one sequence
(``kvslots.packed_layout``), so the products run over the real tokens only, not every row padded to the longest
(a step's drafts range over k = 0..8 and its prefill chunks up to 64 tokens); the gather fallback pads.

Attention, two ways:
- ``slots`` (default): ``slot_attention``, registered with transformers' attention interface, reads each
  row's keys and values straight from its slot (views, no copy) over that row's own length, with a
  causal mask for the row's new tokens only. Nothing is gathered or padded to the longest context.
- ``gather`` (fallback, for models whose attention does not pass keyword arguments through): the cache
  gathers every row's slot into ``[B, H, width, D]`` and a 4-D additive mask hides other positions.
The target checks at load that both agree on its own weights and falls back to ``gather`` if not.

This is the ``transformers`` runtime (``sled_verifier.runtime``): any causal LM, the reference for the
``compiled`` one. Linear layers run batch-invariant by default (``sled_verifier.invariant``), so with slot
attention a row's logits are bitwise those of the row alone. ``device_map`` places the layers across the
machine's GPUs with transformers' own mechanism (accelerate); each layer's KV slots live beside it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sled_verifier import native, tokenwise
from sled_verifier.attention import attend_rows, row_plan
from sled_verifier.invariant import make_batch_invariant
from sled_verifier.kvslots import RowLayout, SlotKV, packed_layout

SLOT_ATTENTION = "sled_slots"


@dataclass(frozen=True)
class PackedRows:
    """What slot attention needs of a packed forward (``sled_verifier.kvslots.packed_layout``): each row's plan
    (``row_plan``), and the moves between the packed tokens and the padded rows ``attend_rows`` takes."""

    plan: list
    unpack: torch.Tensor  # [B, M] each padded place's token
    pack: torch.Tensor    # [T] each token's place in [B * M]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """``attend_rows`` of a packed forward: ``query`` ``[1, H, T, D]`` unpacked to the rows ``[B, H, M, D]``
        (laid out as an unpacked forward's, so each row's attention is the same call on the same values), the
        result packed back to ``[1, T, H, D]``."""
        rows = query[0].transpose(0, 1)[self.unpack].transpose(1, 2)                      # [B, H, M, D]
        attended = attend_rows(rows, key, value, self.plan, scaling)                      # [B, M, H, D]
        return attended.flatten(0, 1)[self.pack][None]                                    # [1, T, H, D]


@dataclass(frozen=True)
class PackedGroups:
    """A packed forward's rows in consecutive groups, each unpacked to its own longest row: a step's (k + 1)-token
    rows are not padded to the 64 tokens of a prefill chunk beside them (padded together, the query gather of 40
    rows grew 12x and ate the saving of running the chunk in the verification forward)."""

    groups: list[PackedRows]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """``PackedRows.attend`` of each group, its tokens in packed order: ``[1, T, H, D]``."""
        return torch.cat([group.attend(query, key, value, scaling) for group in self.groups], dim=1)


@dataclass(frozen=True)
class PackedLogits:
    """A packed forward's logits as its head wrote them, ``[T, V]``, read as the rows' ``[B, M, V]`` through
    ``unpack`` without copying them there (``forward_rows(packed_logits=True)``): a step's rows are ragged (k =
    0-8 as each device prices it), so the padded copy was several times the logits (SmolLM2, 38 rows of up to 9
    tokens: 67 MB, ~31 ms a step on one core) and torch's argmax over it another ~25 ms, where the greedy path needs
    only each real token's argmax. ``argmax`` is per token then unpacked; ``rows[i]`` copies those rows alone (the
    sampled ones)."""

    packed: torch.Tensor  # [T, V]
    unpack: torch.Tensor  # [B, M]: each padded place's token

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.unpack.shape, self.packed.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def is_cuda(self) -> bool:
        return self.packed.is_cuda

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """Each place's argmax ``[B, M]``: bitwise the padded tensor's ``argmax(dim=-1)``."""
        if dim not in (-1, 2):
            raise ValueError("PackedLogits.argmax is over the vocabulary only")
        return native.argmax_rows(self.packed)[self.unpack.to(self.packed.device)]

    def __getitem__(self, rows) -> torch.Tensor:
        return self.packed[self.unpack[rows]]                                             # [R, M, V]


def packed_rows(slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]], device: torch.device,
                blocks: bool, dtype: torch.dtype, first_token: int = 0) -> PackedRows:
    """``PackedRows`` of rows whose tokens start at ``first_token`` of the packed sequence."""
    layout = packed_layout(slots, starts, inputs, device)
    return PackedRows(row_plan(slots, starts, inputs, device, blocks, dtype), layout.unpack + first_token, layout.pack)


def packed_plan(layout: RowLayout, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                device: torch.device, blocks: bool, dtype: torch.dtype, logit_rows: int | None = None
                ) -> tuple[PackedRows | PackedGroups, int | None, torch.Tensor]:
    """A packed forward's attention plan (``layout`` from ``SlotKV.packed``) and what its head projects: the first
    tokens' count (None: every token) and the unpack of their rows into ``[R, M_R]``. With ``logit_rows`` below
    the row count, the rows after it (prefill chunks, no logits) attend as a group of their own. Both runtimes'
    packed forwards take it."""
    split = logit_rows if logit_rows is not None and 0 < logit_rows < len(inputs) else len(inputs)
    if split == len(inputs):
        return PackedRows(row_plan(slots, starts, inputs, device, blocks, dtype), layout.unpack, layout.pack), \
            None, layout.unpack
    head_tokens = sum(len(x) for x in inputs[:split])
    first = packed_rows(slots[:split], starts[:split], inputs[:split], device, blocks, dtype)
    rest = packed_rows(slots[split:], starts[split:], inputs[split:], device, blocks, dtype, first_token=head_tokens)
    return PackedGroups([first, rest]), head_tokens, first.unpack


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                   dropout: float = 0.0, scaling: float | None = None, sled_rows: PackedRows | PackedGroups | None = None,
                   **kwargs):
    """transformers' attention interface over ``attend_rows`` for a packed forward (``PackedRows.attend``).
    Without ``sled_rows`` (the model called some other way: generate, a plain call) it is plain SDPA."""
    if sled_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return sled_rows.attend(query, key, value, scaling), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eos_ids_of(model_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (or config.json); a list either way."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def packed_weights(dtype: str, device: torch.device, device_map: str = "") -> tuple[str, torch.dtype | None]:
    """(the dtype to load the model in, the dtype its products' weights are packed in by the native kernels, or
    None). ``bfloat16`` on a CPU with a native bfloat16 product (AMX or AVX512-BF16, ``native.bf16_products``)
    loads float32 and packs only the products' weights in bfloat16: half the bytes a step streams, and on AMX
    bfloat16 products at several times float32's rate, while norms, attention and the KV cache stay float32 (the
    native kernels between the products are float32 ones). Elsewhere the model loads in ``dtype`` and torch's
    kernels run it."""
    if dtype == "bfloat16" and device.type == "cpu" and not device_map and native.bf16_products() is not None:
        return "float32", torch.bfloat16
    return dtype, None


def load_causal_lm(model_dir: Path, device: torch.device, dtype: str, device_map: str = ""):
    """The transformers model from a local directory (never the hub), on ``device`` or spread by ``device_map``."""
    from transformers import AutoModelForCausalLM

    placement = {}
    if device_map:
        try:
            import accelerate  # noqa: F401  (transformers needs it for device_map)
        except ImportError:
            raise ValueError("--device-map needs the accelerate package: pip install accelerate") from None
        placement = {"device_map": json.loads(device_map) if device_map.startswith("{") else device_map}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True,
                                                 **placement)
    if not device_map:
        model = model.to(device)
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            or layer_types != {"full_attention"}:
        raise ValueError(f"{model_dir}: sliding-window or hybrid attention is not supported by the "
                         "verifier's batched mask yet (verification would differ from the target alone)")
    return model.eval()


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer (all the same unless ``device_map`` spread them)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or getattr(getattr(model, "transformer", None), "h", None)
    if layers is None:
        return [next(model.parameters()).device] * model.config.num_hidden_layers
    return [next(layer.parameters()).device for layer in layers]


class TransformersTarget:
    name = "transformers"

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "float32", *,
                 device_map: str = "", batch_invariant: bool = True) -> None:
        self.model_dir = Path(model_dir)
        load_dtype, self.weights = packed_weights(dtype, resolve_device(device), device_map)
        self.model = load_causal_lm(self.model_dir, resolve_device(device), load_dtype, device_map)
        self.device = self.model.get_input_embeddings().weight.device  # inputs go in here; logits come back
        self.layer_devices = layer_devices(self.model)
        # bfloat16 weights are the native kernel's alone (invariant by construction): with or without invariance
        self.batch_invariance = make_batch_invariant(self.model, self.device, weights=self.weights) \
            if batch_invariant or self.weights is not None else "off"
        routed = all(d.type == "cpu" for d in self.layer_devices) and tokenwise.usable(self.model, self.device)
        if routed:
            tokenwise.route_modules(self.model)  # native norms and SiLU x up (``sled_verifier.tokenwise``)
        self.width_invariant = batch_invariant  # block attention (``sled_verifier.attention``); off: plain kernels
        # products and attention native (with slot attention): torch's operators inline (``native.torch_inline``)
        self.native_forward = routed and self.batch_invariance == "native" and batch_invariant \
            and native.attends(self._kv_shape()[1])
        config = self.model.config
        self.vocab_size: int = config.vocab_size
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos_ids = torch.tensor(eos_ids_of(self.model_dir), dtype=torch.int64, device=self.device)
        self.model_id = self.model_dir.name
        self.kv: SlotKV | None = None
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.attention = "gather"
        self.attention = self._choose_attention()

    def _choose_attention(self) -> str:
        """``slots`` if slot attention runs on this model and gives the gather path's logits, else ``gather``."""
        reference_impl = self.model.config._attn_implementation
        probe = SlotKV(self.model.config.num_hidden_layers, *self._kv_shape(), self.model.dtype, self.layer_devices,
                       max_slots=4, max_length=16, slots=4, length=16)
        rows = ([5, 6, 7], [8, 9])
        try:
            self.kv = probe
            gathered = self.forward_rows([0, 1], [0, 0], rows)
            self.model.config._attn_implementation = SLOT_ATTENTION
            self.attention = "slots"
            in_place = self.forward_rows([2, 3], [0, 0], rows)
            # bfloat16 weights round each product's input to bfloat16, where a last-bit difference between the
            # two attentions can move a value by one bfloat16 step (~0.4%): a broken attention is off by far more
            atol, rtol = (5e-2, 2e-2) if self.weights is not None else (1e-4, 1e-3)
            same = torch.allclose(gathered[0, :3], in_place[0, :3], atol=atol, rtol=rtol) and \
                torch.allclose(gathered[1, :2], in_place[1, :2], atol=atol, rtol=rtol)
        except Exception:  # any model whose attention cannot take sled_rows
            same = False
        finally:
            self.kv = None
        if not same:
            self.model.config._attn_implementation = reference_impl
            return "gather"
        return "slots"

    def _kv_shape(self) -> tuple[int, int]:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return heads, head_dim

    def init_kv(self, max_slots: int, max_length: int) -> SlotKV:
        heads, head_dim = self._kv_shape()
        self.kv = SlotKV(self.model.config.num_hidden_layers, heads, head_dim, self.model.dtype, self.layer_devices,
                         max_slots=max_slots,
                         max_length=min(max_length, self.max_positions or max_length))
        return self.kv

    @property
    def packs_rows(self) -> bool:
        """Rows of any lengths share a forward at no padding cost (slot attention packs them), so the engine runs a
        step's prefill chunks in its verification forward (``forward_rows(logit_rows=)``)."""
        return self.attention == "slots" and self._keeps_logits

    @torch.inference_mode()
    def forward_rows(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                     logits: bool = True, logit_rows: int | None = None,
                     packed_logits: bool = False) -> torch.Tensor | PackedLogits:
        """Logits ``[B, M, V]`` of each row's ``inputs`` after the first ``starts[i]`` positions of its slot;
        the rows' keys and values are written into their slots (positions start .. start + len - 1).
        ``logits=False`` (prefill): only the caches matter; the vocabulary projection is skipped (its output
        is then one meaningless position per row). ``logit_rows`` (with ``packs_rows``): only the first R rows
        are projected, ``[R, M_R, V]`` with M_R their longest; the others only write their caches. A row may
        continue another row's slot in the same forward (a prefill chunk, then the verification after it):
        every layer writes all the rows' keys and values before any row attends. ``packed_logits`` (with
        ``packs_rows``): the logits as ``PackedLogits``, not copied into the padded rows."""
        if self.kv is None:
            self.init_kv(max_slots=64, max_length=self.max_positions or 4096)
        if self.native_forward and self.attention == "slots":
            with native.torch_inline():
                return self._forward_rows(slots, starts, inputs, logits, logit_rows, packed_logits)
        return self._forward_rows(slots, starts, inputs, logits, logit_rows, packed_logits)

    def _forward_rows(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                      logits: bool, logit_rows: int | None = None,
                      packed_logits: bool = False) -> torch.Tensor | PackedLogits:
        dev = self.device
        keep = {} if logits or not self._keeps_logits else {"logits_to_keep": 1}
        if self.attention == "slots":  # the rows' tokens end to end: no product runs over padding
            rows = self.kv.packed(slots, starts, inputs, dev)
            plan, _, unpack = packed_plan(rows, slots, starts, inputs, dev, self.width_invariant, self.model.dtype,
                                          logit_rows)
            if logit_rows is not None:  # the first rows' tokens lead the packed sequence: project those alone
                keep = {"logits_to_keep": slice(0, sum(len(x) for x in inputs[:logit_rows]))}
            out = self.model(input_ids=rows.input_ids, position_ids=rows.positions,
                             past_key_values=self.kv.view(rows, in_place=True), use_cache=True,
                             cache_position=torch.arange(rows.input_ids.shape[1], device=dev), sled_rows=plan, **keep)
            if not logits:
                return out.logits[:, -1:].expand(len(inputs), -1, -1)
            unpack = unpack if logit_rows is not None else rows.unpack                   # [R, M_R] or [B, M]
            return PackedLogits(out.logits[0], unpack) if packed_logits else out.logits[0][unpack]
        m_max = max(len(x) for x in inputs)
        rows = self.kv.layout(slots, starts, inputs, m_max, dev)
        visible = torch.arange(rows.width, device=dev)[None, None, :] <= rows.positions[:, :, None]   # [B, M, W]
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=dev)
        mask = mask.masked_fill(~visible, torch.finfo(self.model.dtype).min)[:, None]                 # [B, 1, M, W]
        out = self.model(input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.positions,
                         past_key_values=self.kv.view(rows), use_cache=True,
                         cache_position=torch.arange(m_max, device=dev), **keep)
        return out.logits
