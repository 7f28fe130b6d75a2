"""Compaction copy: move many whole units (rows of a pool's unit table) in one launch.

``copy_rows(table, src, dst)`` copies ``table[src[i]]`` to ``table[dst[i]]`` for every i,
where ``table`` is a ``[num_units, unit_bytes]`` uint8 view of a pool. Sources and
destinations are disjoint, so the Triton kernel copies each row straight to its
destination (bytes moved = 2 x rows x unit_bytes, the floor). Without Triton or a CUDA
device, or for rows that are not 4-byte multiples, one batched torch gather + scatter does
the same (through a temporary, so twice the traffic).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch

from avmp.units import ceil_div

_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_BLOCK_WORDS = 4096  # 16 KiB of a row per program: enough bytes in flight per SM
_kernel: Any = None


def _build_kernel() -> Any:
    """Compile lazily: importing triton is slow and CPU-only runs never need it."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[misc]
    def _copy_rows_kernel(table_ptr, src_ptr, dst_ptr, row_words, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
        move = tl.program_id(0)
        block = tl.program_id(1)
        src = tl.load(src_ptr + move).to(tl.int64)
        dst = tl.load(dst_ptr + move).to(tl.int64)
        offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_words
        words = tl.load(table_ptr + src * row_words + offs, mask=mask)
        tl.store(table_ptr + dst * row_words + offs, words, mask=mask)

    return _copy_rows_kernel


def can_use_triton(table: torch.Tensor) -> bool:
    """Whether the Triton path applies: CUDA tensor, 4-byte rows and base."""
    return (
        _TRITON_AVAILABLE
        and table.is_cuda
        and table.shape[1] % 4 == 0
        and table.data_ptr() % 4 == 0
        and table.stride() == (table.shape[1], 1)
    )


def copy_rows_torch(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Reference path: one gather, one scatter (any device)."""
    table.index_copy_(0, dst, table.index_select(0, src))  # [n, unit_bytes]


def copy_rows_triton(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """One Triton launch over (moves, row blocks); rows copied as 32-bit words."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    words = table.view(torch.int32)  # [num_units, unit_bytes / 4]
    row_words = words.shape[1]
    grid = (src.numel(), ceil_div(row_words, _BLOCK_WORDS))
    _kernel[grid](words, src, dst, row_words, BLOCK=_BLOCK_WORDS, num_warps=8)


def copy_rows(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy rows ``src[i] -> dst[i]`` of ``table`` as one batch.

    Args:
        table: ``[num_units, unit_bytes]`` uint8, rows contiguous.
        src, dst: int64 row indices on ``table``'s device, same length, disjoint.
    """
    if src.numel() == 0:
        return
    if can_use_triton(table):
        copy_rows_triton(table, src, dst)
    else:
        copy_rows_torch(table, src, dst)


def warm_up(device: torch.device, row_bytes: Iterable[int]) -> None:
    """Compile the Triton copy for rows of these sizes now, on a scratch table of two
    rows: otherwise the first compaction of a run pays Triton's compilation (a second
    or more per row size, measured on an H200) on the step that needed the room."""
    for num_bytes in sorted(set(row_bytes)):
        if num_bytes <= 0:
            continue
        table = torch.zeros(2, num_bytes, dtype=torch.uint8, device=device)
        if not can_use_triton(table):
            continue
        src = torch.zeros(1, dtype=torch.int64, device=device)
        copy_rows_triton(table, src, src + 1)
