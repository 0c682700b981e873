"""The packed layout (``kvslots.packed_layout``): a forward's ragged rows end to end, no padding, and the moves
between the packed tokens and the padded rows that attention and the logits keep (bitwise equality of packed
forwards with each row alone is tests/test_width.py's and tests/test_invariance.py's)."""

from __future__ import annotations

import torch

from sled_verifier.kvslots import packed_layout


def test_packed_layout_puts_rows_end_to_end_with_their_positions_and_slots() -> None:
    inputs = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
    layout = packed_layout([4, 0, 7], [10, 3, 0], inputs, torch.device("cpu"))
    assert layout.input_ids.tolist() == [[11, 12, 13, 21, 31, 32, 33, 34, 35]]
    assert layout.positions.tolist() == [[10, 11, 12, 3, 0, 1, 2, 3, 4]]
    assert layout.write_slots.tolist() == [[4, 4, 4, 0, 7, 7, 7, 7, 7]]
    assert layout.write_positions.tolist() == layout.positions.tolist()
    assert layout.width == 13 and layout.lens.tolist() == [3, 1, 5]


def test_unpack_and_pack_move_tokens_between_packed_and_padded_rows() -> None:
    inputs = [[1, 2], [3, 4, 5, 6], [7]]
    layout = packed_layout([0, 1, 2], [0, 0, 0], inputs, torch.device("cpu"))
    packed = layout.input_ids[0]                                    # [T]
    padded = packed[layout.unpack]                                  # [B, M]: padding repeats the row's last token
    assert padded.tolist() == [[1, 2, 2, 2], [3, 4, 5, 6], [7, 7, 7, 7]]
    assert torch.equal(padded.flatten()[layout.pack], packed)       # and back, padding dropped
