"""Mamba2 scan over the new tokens of a ragged batch (prefill), starting from and
ending in each request's slot of the state pool.

Each program owns one (request, head, block of head_dim rows) and walks that request's
tokens in order, keeping its ``[BLOCK_P, d_state]`` slice of the state in registers: one
read of the slot at the start (or zeros for a fresh request), one write at the end, and
per token only that token's x, dt, B and C. This is the recurrent form, not the SSD
chunked form of ``avmp.kernels.reference.mamba2_chunk_scan``: the same function, computed
sequentially in time and in parallel over requests, heads and rows, with no gather of
states into a batch and no scatter back. Per token and head it applies

    dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)     (bias, softplus optional)
    h  = h * exp(dt * A) + dt * B ⊗ x ;  y = h · C + D * x ;  y *= silu(z)

in fp32, as `mamba2_state_update` does for one token.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_same_device,
    check_shape,
    discretise_dt,
    next_power_of_2,
    strides,
)

BLOCK_P = 16


@triton.jit
def _mamba2_varlen_scan_kernel(
    state_ptr, slot_ptr, init_ptr, qsl_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr,
    dt_bias_ptr, z_ptr, out_ptr,
    stride_ss, stride_sh, stride_sp, stride_sn,
    stride_slot, stride_init,
    stride_xt, stride_xh, stride_xp,
    stride_dtt, stride_dth,
    stride_a, stride_bt, stride_bg, stride_bn, stride_ct, stride_cg, stride_cn,
    stride_d, stride_dtbias,
    stride_zt, stride_zh, stride_zp,
    stride_ot, stride_oh, stride_op,
    dt_min, dt_max,
    HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_Z: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DT_ROUND: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    p_block = tl.program_id(2)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding row: touch nothing
        return
    group = head // HEADS_PER_GROUP
    start = tl.load(qsl_ptr + b).to(tl.int64)
    end = tl.load(qsl_ptr + b + 1).to(tl.int64)
    offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < HEAD_DIM
    mask_n = offs_n < D_STATE
    mask_pn = mask_p[:, None] & mask_n[None, :]

    state_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn)
    h = tl.load(state_ptrs, mask=mask_pn, other=0.0).to(tl.float32)  # [P, N]
    if HAS_INIT_FLAGS:
        h = tl.where(tl.load(init_ptr + b * stride_init) != 0, h, 0.0)
    a = tl.load(a_ptr + head * stride_a).to(tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + head * stride_d).to(tl.float32)
    dt_bias = 0.0
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + head * stride_dtbias).to(tl.float32)

    for t in range(start, end):
        x = tl.load(x_ptr + t * stride_xt + head * stride_xh + offs_p * stride_xp,
                    mask=mask_p, other=0.0).to(tl.float32)  # [P]
        dt = tl.load(dt_ptr + t * stride_dtt + head * stride_dth).to(tl.float32)
        dt = discretise_dt(dt, dt_bias, dt_min, dt_max, dt_ptr.dtype.element_ty,
                           HAS_DT_BIAS, DT_SOFTPLUS, DT_ROUND)
        bvec = tl.load(b_ptr + t * stride_bt + group * stride_bg + offs_n * stride_bn,
                       mask=mask_n, other=0.0).to(tl.float32)  # [N]
        cvec = tl.load(c_ptr + t * stride_ct + group * stride_cg + offs_n * stride_cn,
                       mask=mask_n, other=0.0).to(tl.float32)  # [N]
        h = h * tl.exp(dt * a) + (dt * x)[:, None] * bvec[None, :]
        y = tl.sum(h * cvec[None, :], axis=1)  # [P]
        if HAS_D:
            y += x * d
        if HAS_Z:
            z = tl.load(z_ptr + t * stride_zt + head * stride_zh + offs_p * stride_zp,
                        mask=mask_p, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + t * stride_ot + head * stride_oh + offs_p * stride_op,
                 y.to(out_ptr.dtype.element_ty), mask=mask_p)

    # Replicated elements: every thread must have read the old state before a store.
    tl.debug_barrier()
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_pn)


def _check_inputs(
    state: torch.Tensor, slot_idx: torch.Tensor, query_start_loc: torch.Tensor,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    optional: dict[str, torch.Tensor | None],
) -> None:
    if state.dim() != 4 or x.dim() != 3 or B.dim() != 3:
        raise ValueError("state must be [slots, H, P, N], x [T, H, P], B and C [T, G, N]")
    tokens, heads, head_dim = x.shape
    d_state, groups, batch = state.shape[3], B.shape[1], slot_idx.shape[0]
    check_shape("state", state, (state.shape[0], heads, head_dim, d_state))
    check_shape("slot_idx", slot_idx, (batch,))
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    check_shape("dt", dt, (tokens, heads))
    check_shape("A", A, (heads,))
    check_shape("B", B, (tokens, groups, d_state))
    check_shape("C", C, (tokens, groups, d_state))
    if heads % groups:
        raise ValueError(f"{heads} heads are not a multiple of {groups} groups")
    expected = {"z": tuple(x.shape), "has_initial_state": (batch,)}
    for name, t in optional.items():
        if t is not None:
            check_shape(name, t, expected.get(name, (heads,)))
    check_dtype("state", state, FLOAT_DTYPES)
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    check_same_device(state=state, slot_idx=slot_idx, qsl=query_start_loc, x=x, dt=dt, A=A,
                      B=B, C=C, **optional)


def mamba2_varlen_scan(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    query_start_loc: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    dt_round: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scan each request's new tokens through its Mamba2 state, in place in its slot.

    Args:
        state: ``[num_slots, heads, head_dim, d_state]`` pool view (any strides): read
            as each request's initial state, overwritten with its final state.
        slot_idx: ``[batch]`` slot per request (negative: padding row, untouched).
        query_start_loc: ``[batch + 1]`` offsets of each request's tokens in x.
        x: ``[T, heads, head_dim]``; dt: ``[T, heads]``; A: ``[heads]``;
        B, C: ``[T, groups, d_state]``; D, dt_bias: optional ``[heads]``;
        z: optional ``[T, heads, head_dim]`` gate.
        has_initial_state: optional ``[batch]``; where 0 the scan starts from zeros and
            ignores whatever the slot holds (a fresh request). None: every slot is read.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        dt_limit: clamp of the discretised dt (transformers' ``time_step_limit``).
        dt_round: discretise dt as torch does in dt's dtype (each step rounded to it)
            rather than in fp32 throughout.
        out: optional ``[T, heads, head_dim]`` output, written in place.

    Returns:
        ``out``, or a new tensor in x's dtype.
    """
    optional = {"D": D, "dt_bias": dt_bias, "z": z, "has_initial_state": has_initial_state}
    _check_inputs(state, slot_idx, query_start_loc, x, dt, A, B, C, optional)
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    heads, head_dim = x.shape[1], x.shape[2]
    batch, groups, d_state = slot_idx.shape[0], B.shape[1], state.shape[3]
    if batch == 0:
        return out
    if has_initial_state is not None and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.int8)  # same bytes, loadable
    grid = (batch, heads, triton.cdiv(head_dim, BLOCK_P))
    _mamba2_varlen_scan_kernel[grid](
        state, slot_idx, slot_idx if has_initial_state is None else has_initial_state,
        query_start_loc, x, dt, A, B, C, x if D is None else D,
        x if dt_bias is None else dt_bias, x if z is None else z, out,
        *state.stride(), slot_idx.stride(0), *strides(has_initial_state, 1), *x.stride(),
        *dt.stride(), A.stride(0), *B.stride(), *C.stride(), *strides(D, 1),
        *strides(dt_bias, 1), *strides(z, 3), *out.stride(),
        float(dt_limit[0]), float(dt_limit[1]),
        HEADS_PER_GROUP=heads // groups, HEAD_DIM=head_dim, D_STATE=d_state,
        BLOCK_P=BLOCK_P, BLOCK_N=next_power_of_2(d_state),
        HAS_INIT_FLAGS=has_initial_state is not None, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_Z=z is not None, DT_SOFTPLUS=dt_softplus,
        DT_ROUND=dt_round,
    )
    return out
