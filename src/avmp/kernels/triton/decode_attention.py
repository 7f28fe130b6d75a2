"""Decode attention over page-major KV: one new query token per request, many requests
per launch, keys and values gathered through a block table on the device.

The KV views come straight from the AVMP pool, so a page's stride is the whole page
(every attention layer's K and V), not ``block_size * kv_heads * head_dim``; the kernel
takes every stride as an argument. Each program serves all query heads of one KV head
(GQA), so K and V are read once per KV head, not once per query head. Long contexts are
split across programs (flash-decoding) and the partial results merged by a second,
small kernel; the split count is chosen on the host from shapes alone, so a call never
synchronises with the device.
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
    num_sms,
    upcast_dot,
)

LOG2E = 1.4426950408889634
# Tokens per loop step. On an H100, 64 rather than 32 read Granite-4.0-H-Micro's K and V
# (64 requests, 8 KV heads of 64) 1.14x faster at 512 cached tokens and 1.2x at 2,048
# (benchmarks/decode_attention_tiles.py, docs/BENCHMARKS.md); wider heads keep 32 so the
# pipeline's stages of K and V stay within shared memory.
BLOCK_N = 64
WIDE_HEAD_BLOCK_N = 32
# A split shorter than this costs more in the merge than it gains in parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


# the block table's row stride is the step's widest table, which changes from step to
# step: specialised, it would compile this kernel again for each class it falls in
@triton.jit(do_not_specialize=["stride_btb"])
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    scale_log2, block_size, tokens_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    mask_gd = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=mask_gd, other=0.0,
    )  # [G, D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        mask_t = offs_t < end
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
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [G, N]
        scores = tl.where(mask_t[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty context or split (l_i == 0) yields zeros and lse = -inf.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / safe_l[:, None]
    out_offs = (
        b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
        + offs_d[None, :] * stride_od
    )
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_gd)
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))  # log2 domain
        tl.store(
            lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse,
            mask=offs_g < GROUP,
        )


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(
        lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls,
        mask=mask_s, other=float("-inf"),
    )  # [S]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)  # [S], zero for empty splits
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
        + offs_d[None, :] * stride_pd,
        mask=mask_s[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0,
    )  # [S, D]
    total = tl.sum(weights, axis=0)
    total = tl.where(total > 0, total, 1.0)
    out = tl.sum(part * weights[:, None], axis=0) / total
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM,
    )


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many programs share one (request, KV head): enough to give every SM about
    two programs, never a split shorter than MIN_TOKENS_PER_SPLIT tokens."""
    wanted = triton.cdiv(2 * num_sms(device), max(batch * num_kv_heads, 1))
    by_length = triton.cdiv(max(max_context, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be [B, Hq, D] and k_cache [num_pages, block_size, Hkv, D]")
    batch, num_heads, head_dim = q.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {k_cache.shape[2]}")
    check_dtype("q", q, FLOAT_DTYPES)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q, k_cache and v_cache must share one dtype")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages]")
    check_shape("context_lens", context_lens, (batch,))
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_dtype("context_lens", context_lens, INDEX_DTYPES)
    check_same_device(q=q, k=k_cache, v=v_cache, bt=block_tables, ctx=context_lens)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per request over its cached keys and values.

    Args:
        q: ``[B, Hq, D]`` queries (fp16, bf16 or fp32), any strides.
        k_cache, v_cache: ``[num_pages, block_size, Hkv, D]`` views over the KV pool,
            any strides; ``Hq`` must be a multiple of ``Hkv``.
        block_tables: ``[B, max_pages]`` int32/int64 page ids; entry ``i`` of row ``b``
            holds tokens ``i * block_size ...`` of request ``b``.
        context_lens: ``[B]`` tokens in each request's cache, the new one included;
            the query attends to positions ``0 .. context_lens[b] - 1``. A request
            with 0 tokens gets a zero output.
        scale: softmax scale (usually ``D ** -0.5``).
        out: optional ``[B, Hq, D]`` output (any strides), written in place.
        num_splits: programs per (request, KV head); chosen from the shapes if None.
        block_n, num_warps, num_stages: tokens per loop step (a power of two >= 16;
            ``BLOCK_N``, or ``WIDE_HEAD_BLOCK_N`` past 128 of head dim, if None) and
            Triton's launch settings (its defaults if None): what
            benchmarks/decode_attention_tiles.py sweeps.

    Returns:
        ``out``, or a new ``[B, Hq, D]`` tensor in q's dtype. fp32 accumulation.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape))
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_n is None:
        block_n = BLOCK_N if head_dim <= 128 else WIDE_HEAD_BLOCK_N
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    tokens_per_split = triton.cdiv(triton.cdiv(max_context, num_splits), block_n) * block_n
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=next_power_of_2(group, 16),
        BLOCK_D=next_power_of_2(head_dim, 16), BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
    )
    if num_warps is not None:
        meta["num_warps"] = num_warps
    if num_stages is not None:
        meta["num_stages"] = num_stages
    grid = (batch, num_kv_heads, num_splits)
    common = (
        q, k_cache, v_cache, block_tables, context_lens,
    )
    strides_in = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride())
    scalars = (scale * LOG2E, block_size, tokens_per_split)
    if num_splits == 1:
        _decode_attention_kernel[grid](
            *common, out, out, *strides_in,
            out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0,
            *scalars, SPLIT=False, **meta,
        )
        return out
    part = torch.empty((batch, num_heads, num_splits, head_dim), device=q.device,
                       dtype=torch.float32)  # [B, Hq, S, D]
    lse = torch.empty((batch, num_heads, num_splits), device=q.device, dtype=torch.float32)
    _decode_attention_kernel[grid](
        *common, part, lse, *strides_in, *part.stride(), *lse.stride(),
        *scalars, SPLIT=True, **meta,
    )
    _merge_splits_kernel[(batch, num_heads)](
        part, lse, out, *part.stride(), *lse.stride(), *out.stride(), num_splits,
        HEAD_DIM=head_dim, BLOCK_S=next_power_of_2(num_splits, 2),
        BLOCK_D=next_power_of_2(head_dim, 16),
    )
    return out
