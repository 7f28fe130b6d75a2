"""Causal depthwise conv1d over the new tokens of a ragged batch (prefill chunks and
decodes in one step), starting from and ending in each request's conv slot.

Every sequence's window is its history (the last ``columns`` inputs kept in its slot,
or zeros when ``has_initial_state`` is 0) followed by its new tokens; output row t is
``act(bias + sum_k w[k] * window[t + k])`` over the last ``d_conv`` inputs up to t,
accumulated in fp32, as `avmp.kernels.reference.causal_conv1d` computes it per
sequence. Afterwards the slot holds the sequence's last ``columns`` inputs (history then
new tokens), also when the sequence is shorter than ``columns``. A one-token sequence is
exactly a `conv1d_update` step, so one launch serves a whole mixed step.

The work is cut by tokens, not by sequences. `conv_tiles` builds the step's tile table
on the device with the chunked scan's `chunk_layout` (``BLOCK_T``-token chunks): one
entry per ``BLOCK_T`` new tokens of one sequence, sequences with a negative slot
(padding) getting none, then -1 entries up to the `max_chunks` bound that the step's
token and sequence counts set. A program owns one (entry, channel block), so the grid
follows from shapes alone (a step runs inside a CUDA graph capture without a host
sync), a long prefill chunk spreads over as many programs as it has tiles whatever
else the step holds, and a decode costs one small program per channel block. (A grid
over sequences, with programs splitting a sequence's tiles by a count derived from the
batch size, gave every padded sequence a program and left a long chunk's tiles serial
in one program once a graph's bucket held many sequences.) A step builds the table
once and every layer reuses it (the engine keeps it in its batch's ``conv_tiles``).

The program of a sequence's first tile also computes the head, the first
``d_conv - 1`` rows, whose windows reach back into the slot's old history, and then
writes the new history: it is the only program that reads or writes the slot, and it
reads all of it before its own barrier-guarded store, so no program reads a slot
another program writes. Every other row is computed by its tile's program, each tap one
shifted ``[BLOCK_T, BLOCK_C]`` load of x alone (a history load per tap as well doubles
the live pointers: ptxas spills it for sm_90). A sequence with no new tokens has no
tile: its slot is left as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_conv_geometry,
    check_dtype,
    check_same_device,
    check_shape,
    next_power_of_2,
    round_to,
    strides,
)
from avmp.kernels.triton.mamba2_chunk_scan import chunk_layout, max_chunks

BLOCK_C = 64
# Tokens per tile: one program's rows (of one channel block), and the tile table's unit.
BLOCK_T = 32
FLAG_DTYPES = (torch.bool, torch.int8, torch.int32, torch.int64)


@triton.jit
def _conv_rows(
    x_rows, state_row, out_rows, rows, lo, hi, has_init, offs_c, mask_c, w_ptr, bias_ptr,
    stride_xt, stride_sw, stride_ot, stride_wc, stride_wk, stride_bias,
    COLUMNS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HISTORY: tl.constexpr,
):
    """Output the ``rows`` (``[BLOCK_R]`` positions in the sequence) in ``[lo, hi)`` of
    one channel block. With HISTORY the taps before the sequence start read the slot's
    old history (zeros for a fresh one); without, every tap must land on a new token
    (``lo >= d_conv - 1``)."""
    mask_rows = (rows >= lo) & (rows < hi)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        # Tap k meets the input WIDTH - 1 - k positions back; negative: history column.
        pos = rows - (WIDTH - 1 - k)  # [R]
        w = tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=mask_c, other=0.0)
        vals = tl.load(x_rows[None, :] + pos[:, None] * stride_xt,
                       mask=(mask_rows & (pos >= 0))[:, None] & mask_c[None, :],
                       other=0.0).to(tl.float32)  # [R, C]
        if HISTORY:
            # the fresh-history flag selects after the load, not in its mask: a mask that
            # mixes a scalar into a broadcast vector is refused by newer interpreters
            old = tl.load(state_row[None, :] + (COLUMNS + pos)[:, None] * stride_sw,
                          mask=(mask_rows & (pos < 0))[:, None] & mask_c[None, :], other=0.0)
            old = tl.where(has_init, old.to(tl.float32), 0.0)
            vals += old  # exact: where one of the two loads, the other is 0
        acc += w.to(tl.float32)[None, :] * vals
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_rows[None, :] + rows[:, None] * stride_ot, acc.to(out_rows.dtype.element_ty),
             mask=mask_rows[:, None] & mask_c[None, :])


@triton.jit
def _write_history(
    x_rows, state_row, length, has_init, mask_c, stride_xt, stride_sw,
    COLUMNS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The slot's new history: column j holds the input at position length - COLUMNS + j,
    a new token, or (sequences shorter than COLUMNS) an old history column, or zero
    (fresh history)."""
    cols = tl.arange(0, BLOCK_S)
    pos = length - COLUMNS + cols  # [S]
    mask_cols = cols < COLUMNS
    new = tl.load(x_rows[:, None] + pos[None, :] * stride_xt,
                  mask=mask_c[:, None] & (mask_cols & (pos >= 0))[None, :], other=0.0)
    old = tl.load(state_row[:, None] + (COLUMNS + pos)[None, :] * stride_sw,
                  mask=mask_c[:, None] & (mask_cols & (pos < 0))[None, :], other=0.0)
    old = tl.where(has_init, old, tl.zeros_like(old))  # (a fresh history: see _conv_rows)
    state_dtype = state_row.dtype.element_ty
    new = round_to(new.to(tl.float32), state_dtype).to(state_dtype)
    hist = tl.where((pos >= 0)[None, :], new, old)  # [C, S]
    # The store overwrites columns other threads of this program loaded (and replicated
    # elements are loaded by several threads): let every load land first.
    tl.debug_barrier()
    tl.store(state_row[:, None] + cols[None, :] * stride_sw, hist,
             mask=mask_c[:, None] & mask_cols[None, :])


@triton.jit
def _causal_conv1d_varlen_kernel(
    x_ptr, state_ptr, qsl_ptr, slot_ptr, init_ptr, tile_seq_ptr, tile_start_ptr, w_ptr,
    bias_ptr, out_ptr,
    stride_xt, stride_xc, stride_ss, stride_sc, stride_sw,
    stride_qsl, stride_slot, stride_init, stride_tseq, stride_tstart,
    stride_wc, stride_wk, stride_bias, stride_ot, stride_oc,
    CHANNELS: tl.constexpr, COLUMNS: tl.constexpr, WIDTH: tl.constexpr,
    CHANNEL_BLOCKS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    # Channel blocks vary fastest: programs that run together cover whole rows of x.
    entry = tl.program_id(0) // CHANNEL_BLOCKS
    c_block = tl.program_id(0) % CHANNEL_BLOCKS
    b = tl.load(tile_seq_ptr + entry * stride_tseq)
    if b < 0:  # past the step's tiles
        return
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding sequence (the table gives it no tile): touch nothing
        return
    start = tl.load(qsl_ptr + b * stride_qsl).to(tl.int64)
    length = tl.load(qsl_ptr + (b + 1) * stride_qsl).to(tl.int64) - start
    first = tl.load(tile_start_ptr + entry * stride_tstart).to(tl.int64) - start  # tile row 0
    has_init = tl.load(init_ptr + b * stride_init) != 0
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CHANNELS
    state_row = state_ptr + slot * stride_ss + offs_c * stride_sc  # [C]
    x_rows = x_ptr + start * stride_xt + offs_c * stride_xc  # [C], the sequence's row 0
    out_rows = out_ptr + start * stride_ot + offs_c * stride_oc
    HEAD: tl.constexpr = WIDTH - 1  # rows whose window reaches into the history

    if first == 0:
        head = tl.arange(0, BLOCK_H)
        _conv_rows(x_rows, state_row, out_rows, head, 0, tl.minimum(length, HEAD), has_init,
                   offs_c, mask_c, w_ptr, bias_ptr, stride_xt, stride_sw, stride_ot,
                   stride_wc, stride_wk, stride_bias, COLUMNS, WIDTH, BLOCK_H, BLOCK_C,
                   HAS_BIAS, SILU, True)
    lo = tl.maximum(first, HEAD)
    hi = tl.minimum(first + BLOCK_T, length)
    if lo < hi:
        rows = first + tl.arange(0, BLOCK_T)
        _conv_rows(x_rows, state_row, out_rows, rows, lo, hi, has_init, offs_c, mask_c,
                   w_ptr, bias_ptr, stride_xt, stride_sw, stride_ot, stride_wc, stride_wk,
                   stride_bias, COLUMNS, WIDTH, BLOCK_T, BLOCK_C, HAS_BIAS, SILU, False)
    if first == 0:
        _write_history(x_rows, state_row, length, has_init, mask_c, stride_xt, stride_sw,
                       COLUMNS, BLOCK_S)


class ConvTileTable(NamedTuple):
    """A step's tile table on the device (`conv_tiles`).

    Attributes:
        tile_seq: ``[max_tiles]`` int32 sequence of each tile; -1 past the last tile.
        tile_start: ``[max_tiles]`` int32 first token row of each tile.
        block_t: tokens per tile (host-side); the launch checks it is its own ``BLOCK_T``.
    """

    tile_seq: torch.Tensor
    tile_start: torch.Tensor
    block_t: int


def conv_tiles(
    query_start_loc: torch.Tensor, slot_idx: torch.Tensor, num_tokens: int
) -> ConvTileTable:
    """The conv's tile table of a ragged step, on the device (no host read): one entry
    per ``BLOCK_T`` new tokens of each sequence with a slot, in token order, then -1
    entries up to the bound that ``num_tokens`` and the batch size set, so its length
    (the launch grid) depends on those two shapes alone.

    Args:
        query_start_loc: ``[batch + 1]`` offsets of each sequence's tokens.
        slot_idx: ``[batch]`` conv slots (negative: padding, no tile).
        num_tokens: rows of the step's token tensors (padding included): at least
            ``query_start_loc[batch]``.
    """
    bound = max_chunks(num_tokens, slot_idx.shape[0], BLOCK_T)
    layout = chunk_layout(query_start_loc, slot_idx, BLOCK_T, num_tokens, num_chunks=bound)
    return ConvTileTable(layout.chunk_seq, layout.chunk_start, BLOCK_T)


def _check_inputs(
    x: torch.Tensor, conv_state: torch.Tensor, query_start_loc: torch.Tensor,
    slot_idx: torch.Tensor, has_initial_state: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or conv_state.dim() != 3 or weight.dim() != 2 or slot_idx.dim() != 1:
        raise ValueError("x must be [tokens, channels], conv_state [slots, channels, columns], "
                         "weight [channels, d_conv], slot_idx [batch]")
    channels, batch = x.shape[1], slot_idx.shape[0]
    check_conv_geometry(conv_state, channels, weight, bias)
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    check_shape("has_initial_state", has_initial_state, (batch,))
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    check_dtype("has_initial_state", has_initial_state, FLAG_DTYPES)
    check_same_device(x=x, conv_state=conv_state, query_start_loc=query_start_loc,
                      slot_idx=slot_idx, has_initial_state=has_initial_state, weight=weight,
                      bias=bias)


def _check_tiles(tiles: ConvTileTable, x: torch.Tensor) -> None:
    if tiles.block_t != BLOCK_T:
        raise ValueError(f"the tile table has {tiles.block_t}-token tiles; this kernel's "
                         f"are {BLOCK_T}: build it with conv_tiles")
    if tiles.tile_seq.dim() != 1:
        raise ValueError("tiles.tile_seq must be one-dimensional")
    check_shape("tiles.tile_start", tiles.tile_start, tuple(tiles.tile_seq.shape))
    check_dtype("tiles.tile_seq", tiles.tile_seq, INDEX_DTYPES)
    check_dtype("tiles.tile_start", tiles.tile_start, INDEX_DTYPES)
    check_same_device(x=x, tile_seq=tiles.tile_seq, tile_start=tiles.tile_start)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte spans of two tensors intersect (conservative for strided views)."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def causal_conv1d_varlen(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    slot_idx: torch.Tensor,
    has_initial_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    *,
    tiles: ConvTileTable | None = None,
) -> torch.Tensor:
    """The causal conv of every sequence's new tokens, from and into its conv slot.

    Args:
        x: ``[T, channels]`` new inputs of all sequences, back to back (any strides: a
            column slice of the in_proj output does).
        conv_state: ``[num_slots, channels, columns]`` pool view (any strides),
            ``columns >= d_conv - 1``; with ``columns == d_conv`` (transformers) the
            oldest column is kept but never read.
        query_start_loc: ``[batch + 1]`` offsets of each sequence's tokens in x; rows
            from ``query_start_loc[batch]`` on are left untouched in ``out``.
        slot_idx: ``[batch]`` slot per sequence; negative: a padding sequence (its slot,
            if any, and its output rows untouched). Real entries must be distinct.
        has_initial_state: ``[batch]`` (bool or int); 0: the sequence starts from a zero
            history, ignoring what its slot holds (a new request; its slot is then
            overwritten, with zeros where it has fewer than ``columns`` tokens; a
            sequence with no new tokens has no tile and keeps its slot as it is).
        weight: ``[channels, d_conv]``; bias: optional ``[channels]``.
        activation: ``"silu"`` or None.
        out: optional ``[T, channels]`` output, written in place; must not share memory
            with x (programs read x rows that others write).
        tiles: the step's `conv_tiles` (built for these ``query_start_loc`` and
            ``slot_idx``, with at least x's rows as its token count: a shorter table
            leaves the tiles past its end uncomputed), so that every layer of a step
            reuses one table; None builds it here.

    Returns:
        ``out``, or a new tensor in x's dtype (its uncovered rows uninitialised).

    Raises:
        ValueError: mismatched shapes, dtypes or devices, too few state columns, an
            unknown activation, ``out`` overlapping x, or a tile table of another tile
            size or device.
    """
    _check_inputs(x, conv_state, query_start_loc, slot_idx, has_initial_state, weight, bias)
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}; use 'silu' or None")
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    check_same_device(x=x, out=out)
    if _overlaps(out, x):
        raise ValueError("out must not share memory with x")
    if tiles is not None:
        _check_tiles(tiles, x)
    (num_tokens, channels), batch = x.shape, slot_idx.shape[0]
    if batch == 0 or channels == 0:
        return out
    if tiles is None:
        tiles = conv_tiles(query_start_loc, slot_idx, num_tokens)
    channel_blocks = triton.cdiv(channels, BLOCK_C)
    grid = tiles.tile_seq.shape[0] * channel_blocks
    if grid == 0:
        return out
    if has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.int8)  # same bytes, loadable
    columns, width = conv_state.shape[2], weight.shape[1]
    _causal_conv1d_varlen_kernel[(grid,)](
        x, conv_state, query_start_loc, slot_idx, has_initial_state, tiles.tile_seq,
        tiles.tile_start, weight, x if bias is None else bias, out,
        *x.stride(), *conv_state.stride(), query_start_loc.stride(0), slot_idx.stride(0),
        has_initial_state.stride(0), tiles.tile_seq.stride(0), tiles.tile_start.stride(0),
        *weight.stride(), *strides(bias, 1), *out.stride(),
        CHANNELS=channels, COLUMNS=columns, WIDTH=width, CHANNEL_BLOCKS=channel_blocks,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        BLOCK_H=next_power_of_2(width - 1), BLOCK_S=next_power_of_2(columns),
        HAS_BIAS=bias is not None,
        SILU=activation == "silu",
    )
    return out
