"""Zero the rows of a padded step's output that the slot kernels leave unwritten.

The recurrent kernels (the Mamba2 scans, Mamba1's scan, the varlen conv) write the rows of
the sequences that have a state slot and touch nothing else: a padding sequence (slot -1)
and the rows past the last sequence (a bucket wider than the step's tokens) keep what the
buffer held. In a CUDA graph that buffer is reused memory, so those rows must be set;
zero-filling the whole output before the kernel writes every row twice (on Granite-4.0-H's
geometry, 8,192 rows of 4,096 bf16 channels: 64 MiB per Mamba layer of an 8k-token step),
where the unwritten rows are a handful. This zeroes those alone, with nothing read back by the host,
so a captured step replays it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import check_dtype, next_power_of_2

BLOCK_ROWS = 16
MAX_BLOCK_COLS = 1024
# Programs per sequence, each taking every SPLIT-th block of its rows: a bucket's tail can
# be a fifth of the step (thousands of rows), too much for one program.
SPLIT = 32


@triton.jit
def _zero_slotless_rows_kernel(
    out_ptr, qsl_ptr, slot_ptr, num_seqs, num_rows, num_cols, stride_r, stride_c,
    stride_slot, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr,
):
    # Program ``seq`` < num_seqs: that sequence's rows, when it has no slot; program
    # num_seqs: the rows past the last sequence; each of the SPLIT programs along axis 1
    # every SPLIT-th block of them. (One code path for both: the compiler wants a value's
    # type the same on both sides of a branch.)
    seq = tl.program_id(0)
    is_seq = seq < num_seqs
    slot = tl.load(slot_ptr + tl.minimum(seq, tl.maximum(num_seqs - 1, 0)) * stride_slot)
    if is_seq & (slot >= 0):
        return
    first = tl.load(qsl_ptr + seq).to(tl.int64)
    end = tl.load(qsl_ptr + tl.minimum(seq + 1, num_seqs)).to(tl.int64)
    end = tl.where(is_seq, end, first * 0 + num_rows)
    zeros = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    for r0 in range(first + tl.program_id(1) * BLOCK_R, end, SPLIT * BLOCK_R):
        rows = r0 + offs_r
        for c0 in range(0, num_cols, BLOCK_C):
            cols = c0 + offs_c
            tl.store(out_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, zeros,
                     mask=(rows < end)[:, None] & (cols < num_cols)[None, :])


def zero_slotless_rows(
    out: torch.Tensor, query_start_loc: torch.Tensor, slot_idx: torch.Tensor
) -> torch.Tensor:
    """Zero, in place, the rows of ``out`` (``[T, ...]``, each row's trailing dimensions
    contiguous) that belong to a sequence whose slot is negative, or to none (at or past
    ``query_start_loc[-1]``); every other row is left as it is. Returns ``out``.

    Args:
        out: the step's output rows.
        query_start_loc: ``[batch + 1]`` row offsets of the sequences.
        slot_idx: ``[batch]`` state slot per sequence (negative: no slot).
    """
    batch = slot_idx.shape[0]
    if query_start_loc.shape != (batch + 1,):
        raise ValueError(f"query_start_loc must have shape ({batch + 1},), "
                         f"got {tuple(query_start_loc.shape)}")
    check_dtype("query_start_loc", query_start_loc, (torch.int32, torch.int64))
    check_dtype("slot_idx", slot_idx, (torch.int32, torch.int64))
    if out.dim() == 0 or out.shape[0] == 0:
        return out
    rows = out.view(out.shape[0], -1)  # raises unless each row's elements are one stride
    cols = rows.shape[1]
    if cols == 0:
        return out
    if batch == 0:  # the kernel reads one slot entry whatever the batch
        slot_idx = torch.full((1,), -1, dtype=torch.int64, device=out.device)
    grid = (batch + 1, SPLIT)
    _zero_slotless_rows_kernel[grid](
        rows, query_start_loc, slot_idx, batch, rows.shape[0], cols, rows.stride(0),
        rows.stride(1), slot_idx.stride(0), BLOCK_R=BLOCK_ROWS, SPLIT=SPLIT,
        BLOCK_C=min(next_power_of_2(cols), MAX_BLOCK_COLS),
    )
    return out
