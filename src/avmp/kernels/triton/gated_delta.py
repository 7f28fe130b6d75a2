"""Gated delta rule (Gated DeltaNet) over the new tokens of a ragged batch, from and into
each request's slot of the state pool: decode (one token per request) and prefill.

Each program owns one (request, value head, block of value columns) and walks that
request's tokens in order, keeping its ``[dk, BLOCK_V]`` slice of the state in
registers: one read of the slot at the start (zeros for a fresh request), one write at
the end. Per token, in fp32::

    q, k <- l2-normalised (q also scaled by dk ** -0.5)
    S <- exp(g) S ;  u = beta (v - k^T S) ;  S <- S + k u^T ;  o = q^T S

This is the recurrent form, sequential in time and parallel over requests, heads and
columns. The decode step and mixed steps' decode rows run it: it reads and writes each
slot once.

`gated_delta_chunked` is the prefill form (the WY / UT-transform schedule of the
flash-linear-attention library's ``chunk_gated_delta_rule``; the code is ours). Each
sequence's tokens are cut into chunks of ``chunk_size`` that never straddle two
sequences (`mamba2_chunk_scan.chunk_layout`, the table the Mamba2 chunked scan uses).
With ``c`` the cumulative log decay from a chunk's start, ``A[t, s] = beta_t
exp(c_t - c_s) k_t . k_s`` (s < t) and ``M = (I + A)^-1``, three launches:

1. per (chunk, value head): ``c``, then ``M`` by forward substitution, then
   ``W = M diag(beta e^c) K`` and ``U = M diag(beta) V`` (fp32 buffers);
2. per (sequence, value head, block of value columns), sequential over the sequence's
   chunks: from the slot's state ``S`` (zeros for a fresh request), record the chunk's
   start state, ``V' = U - W S`` (written over ``U``), then
   ``S <- e^(c_L) S + (K e^(c_L - c))^T V'``; the final state goes back to the slot;
3. per (chunk, value head, block of value columns): ``O = (Q e^c) S_start +
   (Q K^T * e^(c_t - c_s), causal) V'``.

The slot is read and written by launch 2 only. Products run on the tensor cores in the
inputs' dtype with fp32 accumulation; decays and states are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.deltanet import L2_EPS
from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_same_device,
    check_shape,
    dot_precision,
    next_power_of_2,
    per_token_rows,
    strides,
    upcast_dot,
)
from avmp.kernels.triton.mamba2_chunk_scan import (
    ChunkLayout,
    _check_layout,
    _chunk_bounds,
    chunk_layout,
)

BLOCK_V = 32
# Value columns per program of the chunked form's state passing and outputs: the state
# slice [dk, BLOCK_V_CHUNKED] stays in registers across a sequence's chunks.
BLOCK_V_CHUNKED = 64
CHUNK_SIZE = 64


@triton.jit
def _gated_delta_kernel(
    state_ptr, slot_ptr, init_ptr, qsl_ptr, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, out_ptr,
    stride_ss, stride_sh, stride_sk, stride_sv,
    stride_slot, stride_init,
    stride_qt, stride_qh, stride_qk, stride_kt, stride_kh, stride_kk,
    stride_vt, stride_vh, stride_vv, stride_gt, stride_gh, stride_bt, stride_bh,
    stride_ot, stride_oh, stride_ov,
    scale, eps,
    HEADS_PER_KEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ONE_TOKEN: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    v_block = tl.program_id(2)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding row: touch nothing
        return
    if ONE_TOKEN:
        start = b.to(tl.int64)
        end = start + 1
    else:
        start = tl.load(qsl_ptr + b).to(tl.int64)
        end = tl.load(qsl_ptr + b + 1).to(tl.int64)
    key_head = head // HEADS_PER_KEY
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]

    state_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv)
    h = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [K, V]
    if HAS_INIT_FLAGS:
        h = tl.where(tl.load(init_ptr + b * stride_init) != 0, h, 0.0)

    for t in range(start, end):
        q = tl.load(q_ptr + t * stride_qt + key_head * stride_qh + offs_k * stride_qk,
                    mask=mask_k, other=0.0).to(tl.float32)  # [K]
        k = tl.load(k_ptr + t * stride_kt + key_head * stride_kh + offs_k * stride_kk,
                    mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + offs_v * stride_vv,
                    mask=mask_v, other=0.0).to(tl.float32)  # [V]
        g = tl.load(g_ptr + t * stride_gt + head * stride_gh).to(tl.float32)
        beta = tl.load(beta_ptr + t * stride_bt + head * stride_bh).to(tl.float32)
        q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + eps)) * scale
        k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + eps))
        h = h * tl.exp(g)
        u = (v - tl.sum(h * k[:, None], axis=0)) * beta  # [V]
        h = h + k[:, None] * u[None, :]
        o = tl.sum(h * q[:, None], axis=0)  # [V]
        tl.store(out_ptr + t * stride_ot + head * stride_oh + offs_v * stride_ov,
                 o.to(out_ptr.dtype.element_ty), mask=mask_v)

    # Replicated elements: every thread must have read the old state before a store.
    tl.debug_barrier()
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_kv)


def _check_inputs(
    state: torch.Tensor, slot_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
) -> None:
    if state.dim() != 4 or q.dim() != 3 or v.dim() != 3:
        raise ValueError("state must be [slots, Hv, dk, dv], q and k [T, Hk, dk], v [T, Hv, dv]")
    tokens, key_heads, dk = q.shape
    value_heads, dv = v.shape[1], v.shape[2]
    check_shape("state", state, (state.shape[0], value_heads, dk, dv))
    check_shape("k", k, (tokens, key_heads, dk))
    check_shape("v", v, (tokens, value_heads, dv))
    check_shape("g", g, (tokens, value_heads))
    check_shape("beta", beta, (tokens, value_heads))
    check_shape("slot_idx", slot_idx, (slot_idx.shape[0],))
    if value_heads % key_heads:
        raise ValueError(f"{value_heads} value heads are not a multiple of {key_heads} key heads")
    check_dtype("state", state, FLOAT_DTYPES)
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_dtype(name, t, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_same_device(state=state, slot_idx=slot_idx, q=q, k=k, v=v, g=g, beta=beta)


def _launch(
    state: torch.Tensor, slot_idx: torch.Tensor, query_start_loc: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    has_initial_state: torch.Tensor | None, out: torch.Tensor | None,
) -> torch.Tensor:
    _check_inputs(state, slot_idx, q, k, v, g, beta)
    if out is None:
        out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    check_shape("out", out, tuple(v.shape))
    batch, (_, key_heads, dk), (_, value_heads, dv) = slot_idx.shape[0], q.shape, v.shape
    if batch == 0:
        return out
    if has_initial_state is not None and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.int8)  # same bytes, loadable
    grid = (batch, value_heads, triton.cdiv(dv, BLOCK_V))
    _gated_delta_kernel[grid](
        state, slot_idx, slot_idx if has_initial_state is None else has_initial_state,
        slot_idx if query_start_loc is None else query_start_loc, q, k, v, g, beta, out,
        *state.stride(), slot_idx.stride(0), *strides(has_initial_state, 1),
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *out.stride(),
        dk**-0.5, L2_EPS,
        HEADS_PER_KEY=value_heads // key_heads, DK=dk, DV=dv,
        BLOCK_K=next_power_of_2(dk), BLOCK_V=min(BLOCK_V, next_power_of_2(dv)),
        ONE_TOKEN=query_start_loc is None, HAS_INIT_FLAGS=has_initial_state is not None,
    )  # fmt: skip
    return out


def gated_delta_decode(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per request, updating each request's state in its slot.

    Args:
        state: ``[num_slots, Hv, dk, dv]`` pool view (fp32, bf16 or fp16; any strides).
        slot_idx: ``[N]`` slot per request (negative: a padding row, left untouched);
            entries must be distinct.
        q, k: ``[N, Hk, dk]`` before normalisation; v: ``[N, Hv, dv]``;
        g: ``[N, Hv]`` log decay; beta: ``[N, Hv]``.
        out: optional ``[N, Hv, dv]`` output, written in place.
    Returns:
        ``out``, or a new float32 tensor.
    """
    check_shape("slot_idx", slot_idx, (q.shape[0],))
    return _launch(state, slot_idx, None, q, k, v, g, beta, None, out)


def gated_delta_varlen(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    query_start_loc: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every request's new tokens through the gated delta rule, in place in its slot.

    Args:
        state, slot_idx, q, k, v, g, beta: as `gated_delta_decode`, over ``T`` tokens.
        query_start_loc: ``[B + 1]`` offsets of each request's tokens.
        has_initial_state: optional ``[B]``; where 0 the request starts from zeros
            whatever its slot holds (a fresh request). None: every slot is read.
    Returns:
        ``out``, or a new float32 tensor ``[T, Hv, dv]``.
    """
    check_shape("query_start_loc", query_start_loc, (slot_idx.shape[0] + 1,))
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    if has_initial_state is not None:
        check_shape("has_initial_state", has_initial_state, (slot_idx.shape[0],))
    return _launch(state, slot_idx, query_start_loc, q, k, v, g, beta, has_initial_state, out)


# -- the chunked form (prefill) ------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _mm(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with both operands in ``DOT`` (the inputs' dtype: tensor cores) and an
    fp32 accumulator."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PRECISION)


@triton.jit
def _normalised_rows(ptr, rows, head, stride_t, stride_h, stride_d, mask_l, eps,
                     DIM: tl.constexpr, BLOCK: tl.constexpr):
    """``[L, BLOCK]`` fp32 rows of one head, each l2-normalised as the reference does it
    (``x * rsqrt(sum(x^2) + eps)``); masked rows are zeros."""
    offs = tl.arange(0, BLOCK)
    mask = mask_l[:, None] & (offs < DIM)[None, :]
    x = tl.load(ptr + rows[:, None] * stride_t + head * stride_h + offs[None, :] * stride_d,
                mask=mask, other=0.0).to(tl.float32)
    return x * (1.0 / tl.sqrt(tl.sum(x * x, axis=1) + eps))[:, None]


@triton.jit
def _unit_lower_inverse(a, BLOCK_L: tl.constexpr):
    """``(I + a)^-1`` of a strictly lower-triangular ``[L, L]`` fp32 tile, by forward
    substitution: row ``i`` of the inverse is ``e_i - sum_{j<i} a[i, j] M[j, :]``, so
    rows are finished top to bottom (each step one masked row and one reduction)."""
    idx = tl.arange(0, BLOCK_L)
    is_row = idx[:, None] == idx[None, :]
    m = tl.where(is_row, 1.0, 0.0)
    for i in range(1, BLOCK_L):
        a_i = tl.sum(tl.where(idx[:, None] == i, a, 0.0), axis=0)  # [L]: a[i, j] along j
        m = tl.where(idx[:, None] == i, m - tl.sum(a_i[:, None] * m, axis=0)[None, :], m)
    return m


@triton.jit
def _wy_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, c_ptr, w_ptr, u_ptr,
    stride_kt, stride_kh, stride_kk, stride_vt, stride_vh, stride_vv,
    stride_gt, stride_gh, stride_bt, stride_bh,
    stride_ch, stride_wt, stride_wh, stride_ut, stride_uh,
    eps,
    HEADS_PER_KEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr,
                                       tl.program_id(0), CHUNK)
    if seq < 0:
        return
    head = tl.program_id(1)
    offs_l = tl.arange(0, CHUNK)
    mask_l = offs_l < length
    rows = start + offs_l
    g = tl.load(g_ptr + rows * stride_gt + head * stride_gh, mask=mask_l, other=0.0)
    c = tl.cumsum(g.to(tl.float32), axis=0)  # [L] log decay from the chunk's start
    tl.store(c_ptr + head * stride_ch + rows, c, mask=mask_l)
    beta = tl.load(beta_ptr + rows * stride_bt + head * stride_bh, mask=mask_l,
                   other=0.0).to(tl.float32)
    k = _normalised_rows(k_ptr, rows, head // HEADS_PER_KEY, stride_kt, stride_kh, stride_kk,
                         mask_l, eps, DK, BLOCK_K)  # [L, K]
    lower = offs_l[None, :] < offs_l[:, None]  # s < t
    gap = tl.exp(tl.where(lower, c[:, None] - c[None, :], 0.0))  # masked first: no overflow
    a = tl.where(lower, _mm(k, tl.trans(k), DOT, PRECISION) * gap * beta[:, None], 0.0)
    m = _unit_lower_inverse(a, CHUNK)  # [L, L] fp32
    w = _mm(m, k * (beta * tl.exp(c))[:, None], DOT, PRECISION)  # [L, K]
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows[:, None] * stride_wt + head * stride_wh + offs_k[None, :], w,
             mask=mask_l[:, None] & (offs_k < DK)[None, :])
    for v0 in tl.static_range(0, DV, BLOCK_DV):
        offs_v = v0 + tl.arange(0, BLOCK_DV)
        mask_lv = mask_l[:, None] & (offs_v < DV)[None, :]
        v = tl.load(v_ptr + rows[:, None] * stride_vt + head * stride_vh
                    + offs_v[None, :] * stride_vv, mask=mask_lv, other=0.0).to(tl.float32)
        u = _mm(m, v * beta[:, None], DOT, PRECISION)  # [L, V]
        tl.store(u_ptr + rows[:, None] * stride_ut + head * stride_uh + offs_v[None, :], u,
                 mask=mask_lv)


@triton.jit
def _delta_state_kernel(
    state_ptr, slot_ptr, init_ptr, qsl_ptr, cu_ptr, chunk_start_ptr, k_ptr, c_ptr, w_ptr, u_ptr,
    starts_ptr,
    stride_ss, stride_sh, stride_sk, stride_sv, stride_slot, stride_init,
    stride_kt, stride_kh, stride_kk, stride_ch, stride_wt, stride_wh, stride_ut, stride_uh,
    stride_hc, stride_hh,
    eps,
    HEADS_PER_KEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # padding, or a row another kernel serves: touch nothing
        return
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_l = tl.arange(0, CHUNK)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv)
    h = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [K, V]
    if HAS_INIT_FLAGS:
        h = tl.where(tl.load(init_ptr + b * stride_init) != 0, h, 0.0)
    seq_end = tl.load(qsl_ptr + b + 1).to(tl.int64)
    # int64 bounds: chunk * stride_hc may pass 2^31 on long steps
    for chunk in range(tl.load(cu_ptr + b).to(tl.int64), tl.load(cu_ptr + b + 1).to(tl.int64)):
        start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
        length = tl.minimum(start + CHUNK, seq_end) - start
        mask_l = offs_l < length
        rows = start + offs_l
        tl.store(starts_ptr + chunk * stride_hc + head * stride_hh
                 + offs_k[:, None] * DV + offs_v[None, :], h, mask=mask_kv)
        w = tl.load(w_ptr + rows[:, None] * stride_wt + head * stride_wh + offs_k[None, :],
                    mask=mask_l[:, None] & mask_k[None, :], other=0.0)  # [L, K]
        u_ptrs = u_ptr + rows[:, None] * stride_ut + head * stride_uh + offs_v[None, :]
        mask_lv = mask_l[:, None] & mask_v[None, :]
        v_new = tl.load(u_ptrs, mask=mask_lv, other=0.0) - _mm(w, h, DOT, PRECISION)  # [L, V]
        tl.store(u_ptrs, v_new, mask=mask_lv)
        k = _normalised_rows(k_ptr, rows, head // HEADS_PER_KEY, stride_kt, stride_kh,
                             stride_kk, mask_l, eps, DK, BLOCK_K)
        c = tl.load(c_ptr + head * stride_ch + rows, mask=mask_l, other=0.0)
        c_end = tl.load(c_ptr + head * stride_ch + start + length - 1)
        to_end = tl.where(mask_l, tl.exp(c_end - c), 0.0)  # [L] decay to the chunk's end
        h = h * tl.exp(c_end) + _mm(tl.trans(k * to_end[:, None]), v_new, DOT, PRECISION)
    # Replicated elements: every thread must have read the old state before a store.
    tl.debug_barrier()
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_kv)


@triton.jit
def _delta_output_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, q_ptr, k_ptr, c_ptr, u_ptr, starts_ptr, out_ptr,
    stride_qt, stride_qh, stride_qk, stride_kt, stride_kh, stride_kk,
    stride_ch, stride_ut, stride_uh, stride_hc, stride_hh, stride_ot, stride_oh, stride_ov,
    scale, eps,
    HEADS_PER_KEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr, chunk, CHUNK)
    if seq < 0:
        return
    head = tl.program_id(1)
    key_head = head // HEADS_PER_KEY
    offs_l = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_l = offs_l < length
    mask_v = offs_v < DV
    rows = start + offs_l
    q = _normalised_rows(q_ptr, rows, key_head, stride_qt, stride_qh, stride_qk, mask_l, eps,
                         DK, BLOCK_K) * scale  # [L, K]
    k = _normalised_rows(k_ptr, rows, key_head, stride_kt, stride_kh, stride_kk, mask_l, eps,
                         DK, BLOCK_K)
    c = tl.load(c_ptr + head * stride_ch + rows, mask=mask_l, other=0.0)
    h = tl.load(starts_ptr + chunk * stride_hc + head * stride_hh + offs_k[:, None] * DV
                + offs_v[None, :], mask=(offs_k < DK)[:, None] & mask_v[None, :], other=0.0)
    o = _mm(q * tl.exp(c)[:, None], h, DOT, PRECISION)  # [L, V] from the chunk's start state
    causal = (offs_l[None, :] <= offs_l[:, None]) & mask_l[None, :]
    gap = tl.exp(tl.where(causal, c[:, None] - c[None, :], 0.0))
    scores = tl.where(causal, _mm(q, tl.trans(k), DOT, PRECISION) * gap, 0.0)  # [L, L]
    mask_lv = mask_l[:, None] & mask_v[None, :]
    v_new = tl.load(u_ptr + rows[:, None] * stride_ut + head * stride_uh + offs_v[None, :],
                    mask=mask_lv, other=0.0)
    o += _mm(scores, v_new, DOT, PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_v[None, :] * stride_ov,
             o.to(out_ptr.dtype.element_ty), mask=mask_lv)


def gated_delta_chunked(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    query_start_loc: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    layout: ChunkLayout | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Every request's new tokens through the gated delta rule in chunks, in place in its
    slot: the function of `gated_delta_varlen`, with its arguments, on tensor cores.

    Args:
        state, slot_idx, query_start_loc, q, k, v, g, beta, has_initial_state, out: as
            `gated_delta_varlen` (a negative slot leaves that sequence's state and output
            rows untouched, so another kernel can fill them).
        layout: the step's `chunk_layout` for ``chunk_size`` (computed here, on the
            device, when None).
        chunk_size: tokens per chunk, a power of two >= 16 (tl.dot's smallest tile).
    Returns:
        ``out``, or a new float32 tensor ``[T, Hv, dv]``.
    """
    _check_inputs(state, slot_idx, q, k, v, g, beta)
    batch, tokens = slot_idx.shape[0], q.shape[0]
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    if has_initial_state is not None:
        check_shape("has_initial_state", has_initial_state, (batch,))
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if out is None:
        out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    check_shape("out", out, tuple(v.shape))
    if layout is None:
        layout = chunk_layout(query_start_loc, slot_idx, chunk_size, tokens)
    _check_layout(layout, batch)
    if batch == 0:
        return out
    if has_initial_state is not None and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.int8)  # same bytes, loadable
    work = _delta_buffers(v, k.shape[2], layout.chunk_seq.shape[0])
    dims = _delta_dims(q, v, chunk_size)
    if tokens and layout.chunk_seq.shape[0]:
        _launch_wy(layout, query_start_loc, k, v, g, beta, work, dims)
    _launch_delta_state(layout, state, slot_idx, has_initial_state, query_start_loc, k, work,
                        dims)
    if tokens and layout.chunk_seq.shape[0]:
        _launch_delta_output(layout, query_start_loc, q, k, work, out, dims)
    return out


def _delta_dims(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> dict[str, object]:
    """The compile-time sizes every launch of the chunked form shares."""
    dk, dv = q.shape[2], v.shape[2]
    dot = tl.float32 if upcast_dot(v.dtype) else _TL_DTYPES[v.dtype]
    return {
        "HEADS_PER_KEY": v.shape[1] // q.shape[1], "DK": dk, "DV": dv, "CHUNK": chunk_size,
        "BLOCK_K": next_power_of_2(dk, 16), "DOT": dot, "PRECISION": dot_precision(v.dtype),
    }  # fmt: skip


def _block_v(dv: int) -> int:
    return min(next_power_of_2(dv, 16), BLOCK_V_CHUNKED)


def _delta_buffers(v: torch.Tensor, dk: int, num_chunks: int) -> dict[str, torch.Tensor]:
    """The fp32 intermediates: cumulative decays ``c [Hv, T]``, ``W [T, Hv, dk]``,
    ``U [T, Hv, dv]`` (overwritten with the corrected values V') and the chunks' start
    states ``[chunks, Hv, dk, dv]`` (bounded by the step's tokens and sequences)."""
    tokens, heads, dv = v.shape
    f32 = {"dtype": torch.float32, "device": v.device}
    return {
        "c": per_token_rows(heads, tokens, **f32),
        "w": torch.empty(tokens, heads, dk, **f32),
        "u": torch.empty(tokens, heads, dv, **f32),
        "starts": torch.empty(num_chunks, heads, dk, dv, **f32),
    }


def _launch_wy(
    layout: ChunkLayout, qsl: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
    beta: torch.Tensor, work: dict[str, torch.Tensor], dims: dict[str, object],
) -> None:
    c, w, u = work["c"], work["w"], work["u"]
    grid = (layout.chunk_seq.shape[0], v.shape[1])
    _wy_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, k, v, g, beta, c, w, u,
        *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        c.stride(0), w.stride(0), w.stride(1), u.stride(0), u.stride(1), L2_EPS,
        BLOCK_DV=_block_v(v.shape[2]), **dims,
    )  # fmt: skip


def _launch_delta_state(
    layout: ChunkLayout, state: torch.Tensor, slot_idx: torch.Tensor,
    has_initial_state: torch.Tensor | None, qsl: torch.Tensor, k: torch.Tensor,
    work: dict[str, torch.Tensor], dims: dict[str, object],
) -> None:
    c, w, u, starts = work["c"], work["w"], work["u"], work["starts"]
    block_v = _block_v(state.shape[3])
    grid = (slot_idx.shape[0], state.shape[1], triton.cdiv(state.shape[3], block_v))
    _delta_state_kernel[grid](
        state, slot_idx, slot_idx if has_initial_state is None else has_initial_state, qsl,
        layout.cu_chunks, layout.chunk_start, k, c, w, u, starts,
        *state.stride(), slot_idx.stride(0), *strides(has_initial_state, 1), *k.stride(),
        c.stride(0), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        starts.stride(0), starts.stride(1), L2_EPS,
        BLOCK_V=block_v, HAS_INIT_FLAGS=has_initial_state is not None, **dims,
    )  # fmt: skip


def _launch_delta_output(
    layout: ChunkLayout, qsl: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    work: dict[str, torch.Tensor], out: torch.Tensor, dims: dict[str, object],
) -> None:
    c, u, starts = work["c"], work["u"], work["starts"]
    block_v = _block_v(out.shape[2])
    grid = (layout.chunk_seq.shape[0], out.shape[1], triton.cdiv(out.shape[2], block_v))
    _delta_output_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, q, k, c, u, starts, out,
        *q.stride(), *k.stride(), c.stride(0), u.stride(0), u.stride(1),
        starts.stride(0), starts.stride(1), *out.stride(), q.shape[2] ** -0.5, L2_EPS,
        BLOCK_V=block_v, **dims,
    )  # fmt: skip
