"""Mamba2 one-step (decode) state update for a batch of slots, in place in the pool.

Each request's SSM state lives in its slot of the state pool; the kernel finds it
through a slot-index tensor on the device and updates it where it lies, in its own dtype
(fp32 or bf16), so decode never gathers states into a batch and scatters them back.
The arithmetic follows Mamba2 (mamba_ssm's ``selective_state_update``, transformers'
torch fallback):

    dt  = clamp(softplus(dt + dt_bias))     (bias, softplus optional)
    h   = h * exp(dt * A) + dt * B ⊗ x      (per head; B and C shared by a head group)
    y   = h · C + D * x                     (D optional)
    y  *= silu(z)                           (optional gating)

all in fp32; ``y`` is read from the fp32 state before it is rounded to the pool's dtype.
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
def _mamba2_state_update_kernel(
    state_ptr, slot_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, z_ptr, out_ptr,
    stride_ss, stride_sh, stride_sp, stride_sn,
    stride_slot,
    stride_xb, stride_xh, stride_xp,
    stride_dtb, stride_dth,
    stride_a, stride_bb, stride_bg, stride_bn, stride_cb, stride_cg, stride_cn,
    stride_d, stride_dtbias,
    stride_zb, stride_zh, stride_zp,
    stride_ob, stride_oh, stride_op,
    dt_min, dt_max,
    HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DT_ROUND: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched early (programmatic dependent launch): the inputs come after
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    head = tl.program_id(1)
    p_block = tl.program_id(2)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding row (e.g. of a CUDA-graph batch): touch nothing
        return
    group = head // HEADS_PER_GROUP
    offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < HEAD_DIM
    mask_n = offs_n < D_STATE
    mask_pn = mask_p[:, None] & mask_n[None, :]
    b64 = b.to(tl.int64)

    state_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn)
    h = tl.load(state_ptrs, mask=mask_pn, other=0.0).to(tl.float32)  # [P, N]
    x = tl.load(x_ptr + b64 * stride_xb + head * stride_xh + offs_p * stride_xp,
                mask=mask_p, other=0.0).to(tl.float32)  # [P]
    dt = tl.load(dt_ptr + b64 * stride_dtb + head * stride_dth)
    dt_bias = 0.0
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + head * stride_dtbias).to(tl.float32)
    dt = discretise_dt(dt.to(tl.float32), dt_bias, dt_min, dt_max, dt_ptr.dtype.element_ty,
                       HAS_DT_BIAS, DT_SOFTPLUS, DT_ROUND)
    a = tl.load(a_ptr + head * stride_a).to(tl.float32)
    bvec = tl.load(b_ptr + b64 * stride_bb + group * stride_bg + offs_n * stride_bn,
                   mask=mask_n, other=0.0).to(tl.float32)  # [N]
    cvec = tl.load(c_ptr + b64 * stride_cb + group * stride_cg + offs_n * stride_cn,
                   mask=mask_n, other=0.0).to(tl.float32)  # [N]

    h = h * tl.exp(dt * a) + (dt * x)[:, None] * bvec[None, :]
    # Threads holding replicated elements must all have read the old state before one
    # of them overwrites it.
    tl.debug_barrier()
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_pn)
    y = tl.sum(h * cvec[None, :], axis=1)  # [P]
    if HAS_D:
        y += x * tl.load(d_ptr + head * stride_d).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b64 * stride_zb + head * stride_zh + offs_p * stride_zp,
                    mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + b64 * stride_ob + head * stride_oh + offs_p * stride_op,
             y.to(out_ptr.dtype.element_ty), mask=mask_p)


def _check_inputs(
    state: torch.Tensor, slot_idx: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    optional: dict[str, torch.Tensor | None],
) -> None:
    if state.dim() != 4 or x.dim() != 3 or B.dim() != 3:
        raise ValueError("state must be [slots, H, P, N], x [batch, H, P], B and C [batch, G, N]")
    batch, heads, head_dim = x.shape
    d_state, groups = state.shape[3], B.shape[1]
    check_shape("state", state, (state.shape[0], heads, head_dim, d_state))
    check_shape("slot_idx", slot_idx, (batch,))
    check_shape("dt", dt, (batch, heads))
    check_shape("A", A, (heads,))
    check_shape("B", B, (batch, groups, d_state))
    check_shape("C", C, (batch, groups, d_state))
    if heads % groups:
        raise ValueError(f"{heads} heads are not a multiple of {groups} groups")
    for name, t in optional.items():
        if t is not None:
            check_shape(name, t, tuple(x.shape) if name == "z" else (heads,))
    check_dtype("state", state, (torch.float32, torch.bfloat16, torch.float16))
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_same_device(state=state, slot_idx=slot_idx, x=x, dt=dt, A=A, B=B, C=C, **optional)


def mamba2_state_update(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (-math.inf, math.inf),
    dt_round: bool = False,
    out: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """One Mamba2 decode step for ``batch`` requests, updating their slots in place.

    Args:
        state: ``[num_slots, heads, head_dim, d_state]`` view over the state pool (fp32,
            bf16 or fp16; any strides), updated in place.
        slot_idx: ``[batch]`` slot of each request; a negative entry marks a padding
            row whose state and output are left untouched. Entries must be distinct.
        x: ``[batch, heads, head_dim]``; dt: ``[batch, heads]`` (raw, or discretised
            already when ``dt_bias`` is None and ``dt_softplus`` False).
        A: ``[heads]`` (negative; ``-exp(A_log)``); B, C: ``[batch, groups, d_state]``.
        D, dt_bias: optional ``[heads]``; z: optional ``[batch, heads, head_dim]`` gate.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        dt_limit: clamp of the discretised dt (transformers' ``time_step_limit``).
        dt_round: discretise dt as torch does in dt's dtype (each step rounded to it)
            rather than in fp32 throughout.
        out: optional ``[batch, heads, head_dim]`` output, written in place.
        pdl: launch as a programmatic dependent launch (Hopper and later): the kernel
            lets the next one (the output projection) start early and waits for the
            one before it first.

    Returns:
        ``out``, or a new tensor in x's dtype.
    """
    optional = {"D": D, "dt_bias": dt_bias, "z": z}
    _check_inputs(state, slot_idx, x, dt, A, B, C, optional)
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    batch, heads, head_dim = x.shape
    if batch == 0:
        return out
    d_state, groups = state.shape[3], B.shape[1]
    grid = (batch, heads, triton.cdiv(head_dim, BLOCK_P))
    _mamba2_state_update_kernel[grid](
        state, slot_idx, x, dt, A, B, C,
        x if D is None else D, x if dt_bias is None else dt_bias, x if z is None else z, out,
        *state.stride(), slot_idx.stride(0), *x.stride(), *dt.stride(), A.stride(0),
        *B.stride(), *C.stride(), *strides(D, 1), *strides(dt_bias, 1), *strides(z, 3),
        *out.stride(), float(dt_limit[0]), float(dt_limit[1]),
        HEADS_PER_GROUP=heads // groups, HEAD_DIM=head_dim, D_STATE=d_state,
        BLOCK_P=BLOCK_P, BLOCK_N=next_power_of_2(d_state),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, HAS_Z=z is not None,
        DT_SOFTPLUS=dt_softplus, DT_ROUND=dt_round, USE_PDL=pdl, launch_pdl=pdl,
    )
    return out
