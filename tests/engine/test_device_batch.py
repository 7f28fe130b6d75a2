"""Packing a step's inputs into one array: real rows where the engine put them, padding
rows that every Triton kernel skips (slot -1, context 0, no KV write)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avmp.engine.batch import StepBatch
from avmp.engine.device_batch import (
    PackedStep,
    StepShape,
    device_batch,
    pack_step,
    split_packed,
)
from avmp.engine.runner import SequenceWork


def test_pack_step_pads_with_rows_every_kernel_skips() -> None:
    work = [
        SequenceWork([7, 8, 9], 2, 5, [4, 1], True),  # positions 2..4 over pages 4, 1
        SequenceWork([3], 6, 0, [2, 6], True),  # decode at position 6
    ]
    shape = StepShape(num_tokens=6, num_seqs=4, width=3, num_samples=4)
    # each field rounded up to two int64 (16 bytes): query_start_loc's 5 and nothing else
    assert shape.total == 3 * 6 + 4 * 3 + 7 * 4 + 1 + 4 + 1
    out = np.full(shape.total, 99, dtype=np.int64)
    pack_step(work, 4, out, shape)
    f = split_packed(out, shape)
    assert f.input_ids.tolist() == [7, 8, 9, 3, 0, 0]
    assert f.positions.tolist() == [2, 3, 4, 6, 0, 0]
    assert f.slot_mapping.tolist() == [4 * 4 + 2, 4 * 4 + 3, 1 * 4 + 0, 6 * 4 + 2, -1, -1]
    assert f.block_tables.tolist() == [[4, 1, 0], [2, 6, 0], [0, 0, 0], [0, 0, 0]]
    assert f.context_lens.tolist() == [5, 7, 0, 0]
    assert f.query_start_loc.tolist() == [0, 3, 4, 5, 6]
    assert f.slot_idx.tolist() == [5, 0, -1, -1]
    assert f.has_initial_state.tolist() == [1, 1, 0, 0]
    assert f.sample_rows.tolist() == [2, 3, 4, 5]
    assert f.decode_rows.tolist() == [3, 0, 0, 0]  # the decode's token row, then unused
    assert f.decode_slots.tolist() == [0, -1, -1, -1]
    assert f.decode_seqs.tolist() == [1, 0, 0, 0]


def test_device_batch_groups_the_decodes_as_the_reference_batch_does() -> None:
    """Layers without a Triton path (Mamba1) batch the decodes of a device step too."""
    work = [
        SequenceWork([5], 9, 3, [0, 2, 7], True),
        SequenceWork([7, 8, 9], 2, 5, [4, 1], True),
        SequenceWork([3], 6, 0, [2, 6], True),
    ]
    shape = StepShape(num_tokens=5, num_seqs=3, width=3, num_samples=3)
    out = np.zeros(shape.total, dtype=np.int64)
    pack_step(work, 4, out, shape)
    fields = split_packed(torch.from_numpy(out), shape)
    group = device_batch(fields, work, 4, is_decode=False).decode
    chunks = [(w.num_context, len(w.token_ids), w.slot_row, w.page_rows) for w in work]
    expected = StepBatch.build(chunks, 4, torch.device("cpu")).decode
    assert group is not None and expected is not None
    assert group.token_index.tolist() == expected.token_index.tolist() == [0, 4]
    assert group.slots.tolist() == expected.slots.tolist() == [3, 0]
    assert group.num_tokens.tolist() == expected.num_tokens.tolist() == [10, 7]
    assert group.block_tables.tolist() == [[0, 2, 7], [2, 6, 0]]
    assert device_batch(split_packed(torch.from_numpy(out), shape), [], 4, True).decode is None


@pytest.mark.parametrize(
    "shape", [StepShape(1, 1, 1, 1), StepShape(5, 3, 3, 3), StepShape(17, 9, 5, 2)]
)
def test_every_field_starts_16_bytes_aligned(shape: StepShape) -> None:
    """Triton compiles a kernel once per pointer alignment class: a field whose offset
    followed the step's sizes would recompile the kernels reading it mid-run."""
    base = torch.zeros(shape.total, dtype=torch.int64)
    assert base.data_ptr() % 16 == 0
    for name, part in zip(PackedStep._fields, split_packed(base, shape), strict=True):
        assert part.data_ptr() % 16 == 0, name
    sizes = [part.numel() for part in split_packed(base, shape)]
    assert sizes == list(shape.field_sizes())


def test_a_padded_mixed_step_keeps_its_padded_arrays() -> None:
    """What a CUDA graph of a mixed step reads: two real sequences (a prefill chunk and a
    decode) padded to 16 rows and 4 sequences. Padding sequences own one padding token
    each, the rows past them none; the decode arrays keep all 4 entries (the graph does
    not know how many decodes it replays) and the query bound is the step's rows."""
    work = [SequenceWork([7, 8, 9], 2, 5, [4, 1], True), SequenceWork([3], 6, 0, [2, 6], True)]
    shape = StepShape(num_tokens=16, num_seqs=4, width=16, num_samples=4)
    out = np.full(shape.total, 99, dtype=np.int64)
    pack_step(work, 4, out, shape)
    fields = split_packed(torch.from_numpy(out), shape)
    assert fields.query_start_loc.tolist() == [0, 3, 4, 5, 6]  # rows 6..15: no sequence
    assert fields.slot_mapping[4:].eq(-1).all() and fields.input_ids[4:].eq(0).all()
    assert fields.sample_rows.tolist() == [2, 3, 4, 5]
    batch = device_batch(fields, [], 4, is_decode=False, padded=True)
    assert batch.padded and batch.sequences == () and batch.decode is None
    assert batch.max_query_len == 16
    assert batch.decode_rows.tolist() == [3, 0, 0, 0]
    assert batch.decode_slots.tolist() == [0, -1, -1, -1]
    eager = device_batch(fields, work, 4, is_decode=False)
    assert not eager.padded and eager.max_query_len == 3 and eager.decode_rows.tolist() == [3]
    with pytest.raises(ValueError, match="a padded step names no sequences"):
        device_batch(fields, work, 4, is_decode=False, padded=True)
