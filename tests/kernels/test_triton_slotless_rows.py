"""A padded step's slotless rows are zeroed, and no other row is touched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.slotless_rows import zero_slotless_rows  # noqa: E402

SENTINEL = 7.0


def expected_zero_rows(lens: list[int], slots: list[int], num_rows: int) -> set[int]:
    rows, start = set(), 0
    for length, slot in zip(lens, slots, strict=True):
        if slot < 0:
            rows.update(range(start, start + length))
        start += length
    rows.update(range(start, num_rows))
    return rows


def run(lens: list[int], slots: list[int], num_rows: int, shape: tuple[int, ...],
        dtype: torch.dtype = torch.bfloat16) -> None:
    out = torch.full((num_rows, *shape), SENTINEL, dtype=dtype, device=DEVICE)
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                       device=DEVICE)
    slot_idx = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    assert zero_slotless_rows(out, qsl, slot_idx) is out
    if num_rows == 0:
        return
    zero = expected_zero_rows(lens, slots, num_rows)
    flat = out.reshape(num_rows, -1).cpu().float()
    for row in range(num_rows):
        want = 0.0 if row in zero else SENTINEL
        assert torch.all(flat[row] == want), f"row {row}: expected all {want}"


def test_padding_sequences_and_tail_zeroed_real_rows_kept() -> None:
    # a prompt chunk, two decodes, two padding sequences of one token, two tail rows
    run([5, 1, 1, 1, 1], [3, 0, 2, -1, -1], num_rows=11, shape=(4, 3))


def test_wide_rows_span_several_column_blocks() -> None:
    run([2, 3], [-1, 1], num_rows=6, shape=(2500,), dtype=torch.float32)


def test_long_tail_spread_over_programs() -> None:
    # more tail rows than one sweep of the programs covers (SPLIT x BLOCK_ROWS)
    run([3, 1], [0, -1], num_rows=3 + 1 + 700, shape=(5,))


def test_nothing_to_zero() -> None:
    run([3, 2], [0, 1], num_rows=5, shape=(8,))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=6),
       st.integers(0, 20))
def test_any_batch(seqs: list[tuple[int, bool]], tail: int) -> None:
    lens = [n for n, _ in seqs]
    slots = [i if has_slot else -1 for i, (_, has_slot) in enumerate(seqs)]
    run(lens, slots, num_rows=sum(lens) + tail, shape=(33,))


def test_bad_offsets_rejected() -> None:
    out = torch.zeros(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc must have shape"):
        zero_slotless_rows(out, torch.zeros(2, dtype=torch.int32, device=DEVICE),
                           torch.zeros(2, dtype=torch.int64, device=DEVICE))
