"""Gated delta rule (Gated DeltaNet) over the new tokens of a ragged batch, from and into
each request's slot of the state pool: decode (one token per request) and prefill.

Each program owns one (request, value head, block of value columns) and walks that
request's tokens in order, keeping its ``[dk, BLOCK_V]`` slice of the state in
registers: one read of the slot at the start (zeros for a fresh request), one write at
the end. Per token, in fp32::

    q, k <- l2-normalised (q also scaled by dk ** -0.5)
    S <- exp(g) S ;  u = beta (v - k^T S) ;  S <- S + k u^T ;  o = q^T S

This is the recurrent form, sequential in time and parallel over requests, heads and
columns; it computes the function of `avmp.kernels.deltanet.gated_delta_chunked` (the
chunked form the torch reference runs for prefill), not its chunked schedule.
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
    next_power_of_2,
    strides,
)

BLOCK_V = 32


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
