"""Mamba1 (Jamba) selective scan from and into each request's slot of the state pool:
the one-token decode update and the varlen prefill scan over a step's sequences.

A Mamba1 state is ``[d_inner, d_state]`` per request, every channel with its own dt and
its own row of A, while B and C are shared by all channels of a token. Each program owns
one (request, block of ``BLOCK_D`` channels), keeps its ``[BLOCK_D, d_state]`` tile of the
state in registers and walks the request's tokens in blocks of ``BLOCK_T``: one read of
the slot at the start (zeros for a fresh request), one write at the end, and per block
that block's x, dt, z, B and C, loaded at once. Per token and channel, in fp32:

    dt = softplus(dt + dt_bias)                      (bias, softplus optional)
    h  = exp(dt * A) * h + dt * x * B ;  y = h · C + D * x ;  y *= silu(z)

Every token is an affine map of the state, ``h -> decay h + inject``; within a block an
associative scan composes each token's map with those before it (in parallel over the
block's tokens, as mamba_ssm's CUDA ``selective_scan`` does within a thread block), so
the state after every token of the block comes from the block's start state in one
step, and only blocks follow one another. Decode takes one token per row (``BLOCK_T``
1, no scan).

which is `avmp.kernels.reference.mamba1_scan` / `mamba1_step` followed by the mixer's
gate, and transformers' Jamba ``mamba_selective_scan`` with ``delta_softplus``: dt is
kept in fp32 from the bias addition on (the reference adds the fp32 bias to the
projected dt), the state is rounded to the pool's dtype only when stored, and the
output is computed from the fp32 state. Decode and prefill share the kernel; decode
takes one token per row, so a step of N requests needs no offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SOFTPLUS_THRESHOLD,
    check_dtype,
    check_same_device,
    check_shape,
    next_power_of_2,
    strides,
)

# Channels per program. Decode takes one token per row; prefill scans blocks of tokens,
# its [tokens, channels, d_state] tiles kept near TILE elements (registers), with small
# channel blocks so that a single long prompt still spreads over many SMs.
DECODE_BLOCK_D = 64
SCAN_BLOCK_D = 16
SCAN_BLOCK_T = 16
TILE = 4096


def scan_block_t(d_state: int) -> int:
    """Tokens per block of the prefill scan: up to `SCAN_BLOCK_T`, fewer for a large
    ``d_state`` so the tile stays near `TILE` elements."""
    return max(1, min(SCAN_BLOCK_T, TILE // (SCAN_BLOCK_D * next_power_of_2(d_state))))


@triton.jit
def _compose(decay_1, inject_1, decay_2, inject_2):
    """Two affine state maps ``h -> decay h + inject``, the first applied first."""
    return decay_1 * decay_2, decay_2 * inject_1 + inject_2


@triton.jit
def _mamba1_scan_kernel(
    state_ptr, slot_ptr, init_ptr, qsl_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr,
    dt_bias_ptr, z_ptr, out_ptr,
    stride_ss, stride_sd, stride_sn,
    stride_slot, stride_init,
    stride_xt, stride_xd,
    stride_dtt, stride_dtd,
    stride_ad, stride_an,
    stride_bt, stride_bn, stride_ct, stride_cn,
    stride_d, stride_dtbias,
    stride_zt, stride_zd,
    stride_ot, stride_od,
    D_INNER: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_Z: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):
    b = tl.program_id(0)
    d_block = tl.program_id(1)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding row (e.g. of a CUDA-graph batch): touch nothing
        return
    if DECODE:  # row b is request b's one token
        start = b.to(tl.int64)
        end = start + 1
    else:
        start = tl.load(qsl_ptr + b).to(tl.int64)
        end = tl.load(qsl_ptr + b + 1).to(tl.int64)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D_INNER
    mask_n = offs_n < D_STATE
    mask_dn = mask_d[:, None] & mask_n[None, :]

    state_ptrs = (state_ptr + slot * stride_ss + offs_d[:, None] * stride_sd
                  + offs_n[None, :] * stride_sn)
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)  # [D, N]
    if HAS_INIT_FLAGS:
        h = tl.where(tl.load(init_ptr + b * stride_init) != 0, h, 0.0)
    a = tl.load(a_ptr + offs_d[:, None] * stride_ad + offs_n[None, :] * stride_an,
                mask=mask_dn, other=0.0).to(tl.float32)  # [D, N]
    if HAS_D:
        d_skip = tl.load(d_ptr + offs_d * stride_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d * stride_dtbias, mask=mask_d,
                          other=0.0).to(tl.float32)

    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + offs_t  # [T]
        mask_t = rows < end
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=mask_td, other=0.0).to(tl.float32)  # [T, D]
        dt = tl.load(dt_ptr + rows[:, None] * stride_dtt + offs_d[None, :] * stride_dtd,
                     mask=mask_td, other=0.0).to(tl.float32)  # [T, D]
        if HAS_DT_BIAS:
            dt += dt_bias[None, :]
        if DT_SOFTPLUS:  # torch's softplus: the identity above its threshold
            dt = tl.where(dt <= SOFTPLUS_THRESHOLD, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.where(mask_td, dt, 0.0)  # rows past the sequence: decay 1, input 0
        bmat = tl.load(b_ptr + rows[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                       mask=mask_tn, other=0.0).to(tl.float32)  # [T, N]
        cmat = tl.load(c_ptr + rows[:, None] * stride_ct + offs_n[None, :] * stride_cn,
                       mask=mask_tn, other=0.0).to(tl.float32)  # [T, N]
        decay = tl.exp(dt[:, :, None] * a[None, :, :])  # [T, D, N]
        inject = (dt * x)[:, :, None] * bmat[:, None, :]  # [T, D, N]
        if BLOCK_T > 1:  # each row composed with every row before it in the block
            decay, inject = tl.associative_scan((decay, inject), 0, _compose)
        states = decay * h[None, :, :] + inject  # [T, D, N]: the state after each row
        y = tl.sum(states * cmat[:, None, :], axis=2)  # [T, D]
        if HAS_D:
            y += x * d_skip[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * stride_zt + offs_d[None, :] * stride_zd,
                        mask=mask_td, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 y.to(out_ptr.dtype.element_ty), mask=mask_td)
        # the last row holds the state after the block (padded rows leave it unchanged)
        h = tl.sum(tl.where((offs_t == BLOCK_T - 1)[:, None, None], states, 0.0), axis=0)

    # Replicated elements: every thread must have read the old state before a store.
    tl.debug_barrier()
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_dn)


def _check_inputs(
    state: torch.Tensor, slot_idx: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    optional: dict[str, torch.Tensor | None],
) -> None:
    if state.dim() != 3 or x.dim() != 2 or B.dim() != 2:
        raise ValueError("state must be [slots, d_inner, d_state], x [T, d_inner], B and C "
                         "[T, d_state]")
    tokens, d_inner = x.shape
    d_state = state.shape[2]
    check_shape("state", state, (state.shape[0], d_inner, d_state))
    check_shape("slot_idx", slot_idx, (slot_idx.shape[0],))
    check_shape("dt", dt, (tokens, d_inner))
    check_shape("A", A, (d_inner, d_state))
    check_shape("B", B, (tokens, d_state))
    check_shape("C", C, (tokens, d_state))
    expected = {"z": (tokens, d_inner), "has_initial_state": (slot_idx.shape[0],)}
    for name, t in optional.items():
        if t is not None:
            check_shape(name, t, expected.get(name, (d_inner,)))
    check_dtype("state", state, FLOAT_DTYPES)
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_same_device(state=state, slot_idx=slot_idx, x=x, dt=dt, A=A, B=B, C=C, **optional)


def _launch(
    state: torch.Tensor, slot_idx: torch.Tensor, query_start_loc: torch.Tensor | None,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    optional: dict[str, torch.Tensor | None], dt_softplus: bool, out: torch.Tensor,
    block_t: int, block_d: int,
) -> None:
    D, dt_bias, z = optional["D"], optional["dt_bias"], optional["z"]
    init = optional.get("has_initial_state")
    if init is not None and init.dtype == torch.bool:
        init = init.view(torch.int8)  # same bytes, loadable
    d_inner, d_state = A.shape
    grid = (slot_idx.shape[0], triton.cdiv(d_inner, block_d))
    _mamba1_scan_kernel[grid](
        state, slot_idx, slot_idx if init is None else init,
        slot_idx if query_start_loc is None else query_start_loc,
        x, dt, A, B, C, x if D is None else D, x if dt_bias is None else dt_bias,
        x if z is None else z, out,
        *state.stride(), slot_idx.stride(0), *strides(init, 1), *x.stride(), *dt.stride(),
        *A.stride(), *B.stride(), *C.stride(), *strides(D, 1), *strides(dt_bias, 1),
        *strides(z, 2), *out.stride(),
        D_INNER=d_inner, D_STATE=d_state, BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_N=next_power_of_2(d_state),
        DECODE=query_start_loc is None, HAS_INIT_FLAGS=init is not None, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_Z=z is not None, DT_SOFTPLUS=dt_softplus,
    )


def mamba1_state_update(
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba1 decode step for ``batch`` requests, updating their slots in place.

    Reads no host value, so a CUDA graph can capture it.

    Args:
        state: ``[num_slots, d_inner, d_state]`` view over the state pool (fp32, bf16
            or fp16; any strides), updated in place.
        slot_idx: ``[batch]`` slot of each request; a negative entry marks a padding
            row whose state and output are left untouched. Entries must be distinct.
        x: ``[batch, d_inner]`` (the conv output); dt: ``[batch, d_inner]`` (projected,
            before bias and softplus, or discretised already when ``dt_bias`` is None and
            ``dt_softplus`` False); A: ``[d_inner, d_state]`` (``-exp(A_log)``);
            B, C: ``[batch, d_state]``.
        D, dt_bias: optional ``[d_inner]``; z: optional ``[batch, d_inner]`` gate.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        out: optional ``[batch, d_inner]`` output, written in place.

    Returns:
        ``out``, or a new tensor in x's dtype.
    """
    optional = {"D": D, "dt_bias": dt_bias, "z": z}
    _check_inputs(state, slot_idx, x, dt, A, B, C, optional)
    check_shape("slot_idx", slot_idx, (x.shape[0],))
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    if x.shape[0]:
        _launch(state, slot_idx, None, x, dt, A, B, C, optional, dt_softplus, out, 1,
                DECODE_BLOCK_D)
    return out


def mamba1_varlen_scan(
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
    out: torch.Tensor | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """Scan each request's new tokens through its Mamba1 state, in place in its slot.

    Reads no host value (the token ranges come from ``query_start_loc`` on the device),
    so prefill and mixed steps can be captured too; a decode row is a sequence of one
    token with its initial state.

    Args:
        state: ``[num_slots, d_inner, d_state]`` pool view (any strides): read as each
            request's initial state, overwritten with its final state.
        slot_idx: ``[batch]`` slot per request (negative: padding row, untouched, its
            tokens' outputs unwritten).
        query_start_loc: ``[batch + 1]`` offsets of each request's tokens in x.
        x, dt: ``[T, d_inner]`` (dt as in `mamba1_state_update`); A: ``[d_inner,
            d_state]``; B, C: ``[T, d_state]``; D, dt_bias: optional ``[d_inner]``;
            z: optional ``[T, d_inner]`` gate.
        has_initial_state: optional ``[batch]``; where 0 the scan starts from zeros and
            ignores whatever the slot holds (a fresh request). None: every slot is read.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        out: optional ``[T, d_inner]`` output, written in place.
        block_t: tokens per block (a power of two; 1: one token after another); None
            picks `scan_block_t`.

    Returns:
        ``out``, or a new tensor in x's dtype.
    """
    optional = {"D": D, "dt_bias": dt_bias, "z": z, "has_initial_state": has_initial_state}
    _check_inputs(state, slot_idx, x, dt, A, B, C, optional)
    check_shape("query_start_loc", query_start_loc, (slot_idx.shape[0] + 1,))
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    check_same_device(x=x, query_start_loc=query_start_loc)
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    if slot_idx.shape[0]:
        block_t = scan_block_t(A.shape[1]) if block_t is None else block_t
        if block_t < 1 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two, got {block_t}")
        _launch(state, slot_idx, query_start_loc, x, dt, A, B, C, optional, dt_softplus, out,
                block_t, SCAN_BLOCK_D if block_t > 1 else DECODE_BLOCK_D)
    return out
