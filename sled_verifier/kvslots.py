"""The verifier's KV cache: one preallocated tensor pair per layer, a slot per session, written in place.

Layout per layer: keys and values ``[S, H, L, D]`` (S slots, L positions). A session owns a slot and the
engine tracks how many positions are valid. A forward over a ragged batch writes each row's new keys
and values straight into its slot at its own offset and reads back ``[B, H, width, D]`` for attention,
so rolling back a rejected draft is just not counting its positions (no copy), and nothing is
re-padded or re-split per round. With slot attention (the default where the model allows it) attention
reads each row's slot in place, over that row's own length; otherwise ``update`` gathers the batch's
slots into ``[B, H, width, D]`` (a copy of every row's cache, padded to the longest). One extra slot takes
the writes of padding queries, so a short row padded to a long one never writes past its own tokens (nor past
the position limit).

Two ways to hold memory. By default capacity grows by doubling (slots up to ``max_slots``, positions up to
``max_length``), each growth a copy. The verifier instead ``reserve``s the whole store at start, sized from its
memory budget (``slots_within``), and never allocates again: on a GPU the memory is held at once; on CPU the
tensors are allocated uncommitted (``torch.empty``) and zeroed up to the longest position used so far, so pages
are committed as contexts grow and never past the budget. Zeroing matters: attention masks unread positions
with a zero weight, and zero times a NaN left in fresh memory would still be NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from sled_verifier.attention import key_span


def slots_within(budget_bytes: int, bytes_per_token: int, max_length: int) -> int:
    """Sessions of ``max_length`` positions a store of ``budget_bytes`` holds, beside its padding slot (a slot
    holds ``max_length`` rounded up to attention's key span: ``SlotKV.room``)."""
    return budget_bytes // (bytes_per_token * key_span(max_length)) - 1


@dataclass(frozen=True)
class RowLayout:
    """Where each input of one forward goes: rows ``(slot, start, inputs)`` right-padded to ``m`` inputs.
    A padding query repeats its row's last real position (never past the model's position table) and writes
    into the spare slot, which no row reads. The one layout both runtimes and the cache use."""

    input_ids: torch.Tensor        # [B, M] padding: token 0 (packed: [1, T])
    lens: torch.Tensor             # [B] real inputs per row
    starts: torch.Tensor           # [B] positions already in the row's slot
    slots: torch.Tensor            # [B] the row's slot (read)
    positions: torch.Tensor        # [B, M] each input's position (packed: [1, T])
    write_slots: torch.Tensor      # [B, M] the row's slot, or the spare slot for padding (packed: [1, T])
    write_positions: torch.Tensor  # [B, M] where its key and value go in that slot (packed: [1, T])
    unpack: torch.Tensor | None = None  # packed only: [B, M] each padded place's token in [0, T) (padding: its row's last)
    pack: torch.Tensor | None = None    # packed only: [T] each token's place in the padded rows flattened, [0, B * M)

    @property
    def width(self) -> int:
        """The longest row's context after this forward: the keys attention reads."""
        return int((self.starts + self.lens).max())


def row_layout(slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]], m: int, spare: int,
               device: torch.device) -> RowLayout:
    """The layout of rows padded to ``m`` inputs, padding written into slot ``spare``."""
    lens = torch.tensor([len(x) for x in inputs], device=device)
    starts_t = torch.tensor(list(starts), dtype=torch.int64, device=device)
    slots_t = torch.tensor(list(slots), dtype=torch.int64, device=device)
    input_ids = torch.tensor([[*x] + [0] * (m - len(x)) for x in inputs], dtype=torch.int64, device=device)
    offsets = torch.arange(m, device=device)[None, :]                                       # [1, M]
    real = offsets < lens[:, None]                                                          # [B, M]
    return RowLayout(input_ids=input_ids, lens=lens, starts=starts_t, slots=slots_t,
                     positions=starts_t[:, None] + torch.minimum(offsets, (lens - 1)[:, None]),
                     write_slots=torch.where(real, slots_t[:, None], spare),
                     write_positions=torch.where(real, starts_t[:, None] + offsets, offsets))


def packed_layout(slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
                  device: torch.device) -> RowLayout:
    """The rows' T tokens end to end as one sequence ``[1, T]``, no padding: every product of the forward (q/k/v,
    output, MLP, the vocabulary head) runs over T rows instead of B x the longest row. A step's rows are ragged (k
    from 0 to 8 as each device prices it, prefill chunks up to 64): padded, SmolLM2's fleet at N = 64 made its
    products over 1.6x the real tokens a verification and 1.4x a prefill. ``unpack`` and ``pack`` move per-token
    tensors between this and the padded rows (attention and the logits stay per row)."""
    lens = [len(x) for x in inputs]
    m = max(lens)
    first = [0]
    for length in lens[:-1]:
        first.append(first[-1] + length)
    rows = len(lens)
    tokens = [t for x in inputs for t in x]
    row_of = [row for row, length in enumerate(lens) for _ in range(length)]
    offset = [j for length in lens for j in range(length)]
    unpack = [[first[row] + min(j, lens[row] - 1) for j in range(m)] for row in range(rows)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    starts_t, slots_t = as_tensor(list(starts)), as_tensor(list(slots))
    row_t, offset_t = as_tensor(row_of), as_tensor(offset)
    positions = starts_t[row_t] + offset_t                                                  # [T]
    return RowLayout(input_ids=as_tensor(tokens)[None], lens=as_tensor(lens), starts=starts_t, slots=slots_t,
                     positions=positions[None], write_slots=slots_t[row_t][None], write_positions=positions[None],
                     unpack=as_tensor(unpack), pack=row_t * m + offset_t)


class SlotKV:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | list[torch.device], *, max_slots: int, max_length: int, slots: int = 4,
                 length: int = 256) -> None:
        self.shape = (heads, head_dim)
        # One device per layer: a target spread over GPUs (device_map) keeps each layer's cache beside it.
        self.devices = list(device) if isinstance(device, list | tuple) else [device] * layers
        self.dtype, self.device = dtype, self.devices[0]
        self.max_slots, self.max_length = max_slots, max_length
        # Positions held per slot: max_length rounded up to attention's key block (``key_span``), since the
        # width-invariant attention reads a block's keys that far (masked) whatever the session's length.
        self.room = key_span(max_length)
        self.capacity, self.length = min(slots, max_slots), min(key_span(length), self.room)
        self.keys = [self._empty(self.capacity, self.length, d) for d in self.devices]
        self.values = [self._empty(self.capacity, self.length, d) for d in self.devices]
        self.free = list(range(self.capacity))
        self.reserved = False

    def reserve(self) -> None:
        """Allocate the whole store now (``max_slots`` slots of ``max_length`` positions); it never grows after."""
        lazy = self.device.type == "cpu"  # pages committed when first zeroed (ensure_length), not now
        allocate = torch.empty if lazy else torch.zeros
        shape = (self.max_slots + 1, self.shape[0], self.room, self.shape[1])
        self.keys = self.values = []  # the small first store is freed before the large one is allocated
        self.keys = [allocate(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.values = [allocate(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.capacity, self.free, self.reserved = self.max_slots, list(range(self.max_slots)), True
        self.length = 0 if lazy else self.room
        self.ensure_length(min(256, self.max_length))

    @property
    def total_bytes(self) -> int:
        """Bytes the store holds (reserved) or would hold at ``max_slots`` x ``max_length`` (growing)."""
        return (self.max_slots + 1) * self.room * self.bytes_per_token()

    @property
    def trash(self) -> int:
        """The slot padding queries write into (never read)."""
        return self.capacity

    def _empty(self, slots: int, length: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(slots + 1, self.shape[0], length, self.shape[1], dtype=self.dtype, device=device)

    def bytes_per_token(self) -> int:
        """KV bytes one position of one session takes, all layers."""
        return 2 * len(self.keys) * self.shape[0] * self.shape[1] * self.keys[0].element_size()

    def acquire(self) -> int:
        if not self.free:
            if self.capacity >= self.max_slots:
                raise RuntimeError(f"all {self.max_slots} KV slots are in use")
            self._resize(min(self.max_slots, self.capacity * 2), self.length)
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def ensure_length(self, needed: int) -> None:
        """Positions ``[0, needed)`` of every slot are readable (allocated, and never NaN), and on to the end
        of their key block (``key_span``)."""
        if needed > self.max_length:
            raise ValueError(f"{needed} positions exceed the KV capacity of {self.max_length}")
        needed = key_span(needed)
        if needed > self.length:
            length = max(self.length, 1)
            while length < needed:
                length *= 2
            length = min(length, self.room)
            if self.reserved:
                for table in (*self.keys, *self.values):
                    table[:, :, self.length : length].zero_()
                self.length = length
            else:
                self._resize(self.capacity, length)

    def _resize(self, slots: int, length: int) -> None:
        """Grow every layer, all or nothing: an allocation failure leaves the old tensors in place."""
        grown = []
        for table in (self.keys, self.values):
            layers = []
            for old in table:
                new = self._empty(slots, length, old.device)
                new[: self.capacity, :, : old.shape[2]] = old[: self.capacity]
                layers.append(new)
            grown.append(layers)
        self.keys, self.values = grown
        self.free.extend(range(self.capacity, slots))
        self.capacity, self.length = slots, length

    def layout(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]], m: int,
               device: torch.device) -> RowLayout:
        """``row_layout`` with this store's spare slot, the store grown to hold it."""
        layout = row_layout(slots, starts, inputs, m, self.trash, device)
        self.ensure_length(max(layout.width, m))
        return layout

    def packed(self, slots: Sequence[int], starts: Sequence[int], inputs: Sequence[Sequence[int]],
               device: torch.device) -> RowLayout:
        """``packed_layout``, the store grown to hold it."""
        layout = packed_layout(slots, starts, inputs, device)
        self.ensure_length(layout.width)
        return layout

    def view(self, layout: RowLayout, in_place: bool = False) -> BatchView:
        """A cache for one forward of ``layout``'s rows. ``in_place``: attention reads the slots itself
        (``sled_verifier.target.slot_attention``), so ``update`` hands it the whole per-layer store instead of
        gathering ``[B, H, width, D]`` copies."""
        return BatchView(self, layout, in_place)


class BatchView(Cache):
    """What a transformers model sees as its cache for one forward: writes go into the slots in place."""

    def __init__(self, store: SlotKV, layout: RowLayout, in_place: bool = False) -> None:
        super().__init__(layers=[])
        self.store, self.slots, self.width, self.in_place = store, layout.slots, layout.width, in_place
        self._write_slots, self._write_positions = layout.write_slots, layout.write_positions  # [B, M]
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write slots, write positions and read slots on ``device`` (copied once per device and forward)."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self._write_slots, self._write_positions, self.slots))
        return self._on[device]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        write_slots, write_positions, read_slots = self._indices(keys.device)
        # [B, H, M, D] -> [B, M, H, D] to match keys[slot, :, position] indexing.
        keys[write_slots, :, write_positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[write_slots, :, write_positions] = value_states.transpose(1, 2).to(values.dtype)
        if self.in_place:
            return keys, values  # [S+1, H, L, D]: slot attention takes each row's own slot and length as views
        return keys[read_slots, :, : self.width], values[read_slots, :, : self.width]

    def layer_writes(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        """``(keys, values, write_slots, write_positions)``: the layer's whole store and where this forward's
        tokens go in it, for a forward that writes them itself (``tokenwise.attention_forward``) instead of
        calling ``update``."""
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        write_slots, write_positions, _ = self._indices(keys.device)
        return keys, values, write_slots, write_positions

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, cache_position, layer_idx: int = 0):
        return self.width, 0

    @property
    def is_compileable(self) -> bool:
        return False
