"""Causal prefill attention over page-major KV for a ragged batch (write-then-attend).

The engine first writes the new tokens' K and V into their pages, then calls this: each
request's queries (packed one after another, ``query_start_loc`` marking the starts)
attend to every cached key of that request up to their own position, earlier chunks of
a chunked prefill included. Keys are gathered token by token through the block table,
so any ``block_size`` works and no page has to be copied out of the pool.

The launch grid is either ``max_query_len`` blocks of queries per request (a host bound;
programs past a request's queries exit at once) or a device-side tile table
(`attention_tiles`, one entry per block of ``BLOCK_M`` queries of one request), whose
length follows from the step's token and request counts alone: a CUDA graph of a padded
prefill or mixed step replays it whatever its requests' lengths, and its grid grows with
the tokens, not with requests x tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_same_device,
    check_shape,
    dot_precision,
    next_power_of_2,
    upcast_dot,
)
from avmp.kernels.triton.mamba2_chunk_scan import ChunkLayout, chunk_layout, max_chunks

LOG2E = 1.4426950408889634
BLOCK_M = 64
BLOCK_N = 32


# the block table's row stride is the step's widest table, which changes from step to
# step: specialised, it would compile this kernel again for each class it falls in
@triton.jit(do_not_specialize=["stride_btb"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr, tile_seq_ptr, tile_start_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ot, stride_oh, stride_od,
    scale_log2, block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILED: tl.constexpr,
):
    if TILED:  # program (tile, head): the tile names its request and first query
        tile = tl.program_id(0)
        b = tl.load(tile_seq_ptr + tile)
        if b < 0:  # past the step's last tile
            return
        m_block = (tl.load(tile_start_ptr + tile) - tl.load(qsl_ptr + b)) // BLOCK_M
        head = tl.program_id(1)
    else:  # program (query block, request, head)
        m_block = tl.program_id(0)
        b = tl.program_id(1)
        head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_md = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_md, other=0.0,
    )  # [M, D]
    if UPCAST:
        q = q.to(tl.float32)
    query_pos = ctx - q_len + offs_m  # absolute positions of this block's queries
    kv_end = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t0 in range(0, kv_end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        mask_t = offs_t < kv_end
        page = tl.load(
            bt_ptr + b.to(tl.int64) * stride_btb + (offs_t // block_size) * stride_btp,
            mask=mask_t, other=0,
        ).to(tl.int64)
        in_page = offs_t % block_size
        mask_td = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(
            k_ptr + (page * stride_kp + in_page * stride_kt + kv_head * stride_kh)[:, None]
            + offs_d[None, :] * stride_kd,
            mask=mask_td, other=0.0,
        )  # [N, D]
        v = tl.load(
            v_ptr + (page * stride_vp + in_page * stride_vt + kv_head * stride_vh)[:, None]
            + offs_d[None, :] * stride_vd,
            mask=mask_td, other=0.0,
        )  # [N, D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, N]
        visible = mask_t[None, :] & (offs_t[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Every valid query sees key 0, so m_new is finite on the rows that are stored.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty), mask=mask_md,
    )


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be [T, Hq, D] and k_cache [num_pages, block_size, Hkv, D]")
    num_heads, head_dim = q.shape[1], q.shape[2]
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {k_cache.shape[2]}")
    check_dtype("q", q, FLOAT_DTYPES)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q, k_cache and v_cache must share one dtype")
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages]")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("context_lens", context_lens)):
        check_dtype(name, t, INDEX_DTYPES)
    check_same_device(q=q, k=k_cache, v=v_cache, bt=block_tables, qsl=query_start_loc,
                      ctx=context_lens)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    tiles: ChunkLayout | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their paged KV.

    Args:
        q: ``[T, Hq, D]`` queries of all requests, packed; any strides.
        k_cache, v_cache: ``[num_pages, block_size, Hkv, D]`` pool views (any strides),
            already holding the new tokens' K and V.
        block_tables: ``[B, max_pages]`` page ids per request, in token order.
        query_start_loc: ``[B + 1]`` offsets of each request's queries in ``q``.
        context_lens: ``[B]`` cached tokens per request, the new ones included: query
            ``i`` of request ``b`` sits at ``context_lens[b] - q_len[b] + i`` and sees
            every position up to its own.
        scale: softmax scale.
        max_query_len: an upper bound of ``q_len`` over the batch (host-side, so the
            launch needs no sync); programs past a request's queries exit at once.
            Ignored when ``tiles`` is given.
        out: optional ``[T, Hq, D]`` output, written in place.
        tiles: the step's `attention_tiles`: one program per tile and head, so the
            grid follows from the table's length alone.

    Returns:
        ``out``, or a new tensor in q's dtype. fp32 accumulation.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape))
    batch, num_heads, head_dim = context_lens.shape[0], q.shape[1], q.shape[2]
    if tiles is not None:
        grid: tuple[int, ...] = (tiles.chunk_seq.shape[0], num_heads)
        tile_seq, tile_start = tiles.chunk_seq, tiles.chunk_start
    else:
        grid = (triton.cdiv(max_query_len, BLOCK_M), batch, num_heads)
        tile_seq = tile_start = query_start_loc  # not read
    if batch == 0 or grid[0] <= 0 or q.shape[0] == 0:
        return out
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        tile_seq, tile_start,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        *out.stride(), scale * LOG2E, k_cache.shape[1],
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim, 16), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        TILED=tiles is not None,
    )
    return out


def attention_tiles(query_start_loc: torch.Tensor, num_tokens: int) -> ChunkLayout:
    """The tile table of a ragged step, on the device (no host read): one entry per
    block of ``BLOCK_M`` queries of one request, every request's (padding ones', with
    context 0, too: they store zeros), then -1 entries up to the bound that the step's
    ``num_tokens`` rows and requests set.

    Args:
        query_start_loc: ``[batch + 1]`` offsets of each request's queries.
        num_tokens: rows of the step's query tensor (padding included).
    """
    batch = query_start_loc.shape[0] - 1
    every = torch.zeros(batch, dtype=torch.long, device=query_start_loc.device)
    bound = max_chunks(num_tokens, batch, BLOCK_M)
    return chunk_layout(query_start_loc, every, BLOCK_M, num_tokens, num_chunks=bound)
