"""Causal depthwise conv1d update for decode, with the conv state in its slot, in place.

A request's conv state keeps its last ``columns`` inputs per channel (``d_conv - 1``
as vLLM and mamba_ssm keep them, or ``d_conv`` as transformers does, the oldest column
then kept but never read). One decode step appends the new input ``x`` to that history,
convolves the last ``d_conv`` inputs with the weights, adds the bias, applies SiLU, and
stores the history shifted by one column back into the slot.

The kernel loads the history and the new column as one ``[channels, columns + 1]``
tile and writes the tile back one column to the left, so the shift needs no register
shuffles.
"""

from __future__ import annotations

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
    strides,
)

BLOCK_C = 64
MAX_BLOCK_C = 512
# `block_channels`' aim: programs per SM, one wave the SMs hold at once (each program is
# a short chain of dependent loads, and every further wave pays that chain again).
PROGRAMS_PER_SM = 16


def block_channels(batch: int, channels: int, sms: int) -> int:
    """Channels per program for about ``PROGRAMS_PER_SM`` programs per SM over the
    batch's rows: a power of two in [``BLOCK_C``, ``MAX_BLOCK_C``], no wider than the
    channels need. A batch-64 Granite-4.0-H-Micro step (4,352 channels, 132 SMs) gets
    256 channels, 1,088 programs where ``BLOCK_C`` makes 4,352; batch 1 keeps 64."""
    wanted = next_power_of_2(max(1, batch * channels // (PROGRAMS_PER_SM * max(sms, 1))))
    return max(BLOCK_C, min(MAX_BLOCK_C, wanted, next_power_of_2(channels)))


@triton.jit
def _conv1d_update_kernel(
    state_ptr, slot_ptr, x_ptr, w_ptr, bias_ptr, out_ptr,
    stride_ss, stride_sc, stride_sw,
    stride_slot, stride_xb, stride_xc, stride_wc, stride_wk, stride_bias,
    stride_ob, stride_oc,
    CHANNELS: tl.constexpr, COLUMNS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched early (programmatic dependent launch): the inputs come after
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    c_block = tl.program_id(1)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # a padding row: touch nothing
        return
    b64 = b.to(tl.int64)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_W)  # column COLUMNS is the new input
    mask_c = offs_c < CHANNELS
    state_row = state_ptr + slot * stride_ss + offs_c[:, None] * stride_sc  # [C, 1]

    hist = tl.load(state_row + cols[None, :] * stride_sw,
                   mask=mask_c[:, None] & (cols < COLUMNS)[None, :], other=0.0)  # [C, W]
    x = tl.load(x_ptr + b64 * stride_xb + offs_c * stride_xc, mask=mask_c, other=0.0)  # [C]
    ext = tl.where((cols == COLUMNS)[None, :], x[:, None].to(hist.dtype), hist)  # [C, W]

    # Tap k of the filter meets column COLUMNS + 1 - WIDTH + k of the extended history.
    tap = cols - (COLUMNS + 1 - WIDTH)
    mask_tap = (tap >= 0) & (cols <= COLUMNS)
    w = tl.load(w_ptr + offs_c[:, None] * stride_wc + tap[None, :] * stride_wk,
                mask=mask_c[:, None] & mask_tap[None, :], other=0.0)  # [C, W]
    acc = tl.sum(ext.to(tl.float32) * w.to(tl.float32), axis=1)  # [C]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)

    # The shifted store overwrites columns that other threads of this program loaded
    # (and replicated elements are loaded by several threads): let every load land first.
    tl.debug_barrier()
    tl.store(state_row + (cols[None, :] - 1) * stride_sw, ext,
             mask=mask_c[:, None] & ((cols >= 1) & (cols <= COLUMNS))[None, :])
    tl.store(out_ptr + b64 * stride_ob + offs_c * stride_oc, acc.to(out_ptr.dtype.element_ty),
             mask=mask_c)


def _check_inputs(
    conv_state: torch.Tensor, slot_idx: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    if conv_state.dim() != 3 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError("conv_state must be [slots, channels, columns], x [batch, channels], "
                         "weight [channels, d_conv]")
    batch, channels = x.shape
    check_conv_geometry(conv_state, channels, weight, bias)
    check_shape("slot_idx", slot_idx, (batch,))
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("slot_idx", slot_idx, INDEX_DTYPES)
    check_same_device(conv_state=conv_state, slot_idx=slot_idx, x=x, weight=weight, bias=bias)


def conv1d_update(
    conv_state: torch.Tensor,
    slot_idx: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    pdl: bool = False,
    block_c: int | None = None,
) -> torch.Tensor:
    """One causal conv1d decode step for ``batch`` requests, shifting their slots' conv
    states in place.

    Args:
        conv_state: ``[num_slots, channels, columns]`` view over the state pool (any
            strides); ``columns >= d_conv - 1``.
        slot_idx: ``[batch]`` slot of each request; a negative entry marks a padding row
            (state and output untouched). Entries must be distinct.
        x: ``[batch, channels]`` new inputs; weight: ``[channels, d_conv]``;
        bias: optional ``[channels]``.
        activation: ``"silu"`` or None.
        out: optional ``[batch, channels]`` output, written in place.
        pdl: launch as a programmatic dependent launch (Hopper and later): the kernel
            lets the next one start early and waits for the one before it first.
        block_c: channels per program, a power of two in [16, ``MAX_BLOCK_C``]
            (``BLOCK_C`` when None; `block_channels` sizes it by the batch). Every
            channel's sum is its own, so the bits do not depend on it.

    Returns:
        ``out``, or a new tensor in x's dtype. fp32 accumulation.
    """
    _check_inputs(conv_state, slot_idx, x, weight, bias)
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}; use 'silu' or None")
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    batch, channels = x.shape
    if batch == 0:
        return out
    columns = conv_state.shape[2]
    block_c = BLOCK_C if block_c is None else block_c
    if not isinstance(block_c, int) or block_c & (block_c - 1) or not 16 <= block_c <= MAX_BLOCK_C:
        raise ValueError(f"block_c must be a power of two in [16, {MAX_BLOCK_C}], got {block_c}")
    grid = (batch, triton.cdiv(channels, block_c))
    _conv1d_update_kernel[grid](
        conv_state, slot_idx, x, weight, x if bias is None else bias, out,
        *conv_state.stride(), slot_idx.stride(0), *x.stride(), *weight.stride(),
        *strides(bias, 1), *out.stride(),
        CHANNELS=channels, COLUMNS=columns, WIDTH=weight.shape[1], BLOCK_C=block_c,
        BLOCK_W=next_power_of_2(columns + 1), HAS_BIAS=bias is not None,
        SILU=activation == "silu", USE_PDL=pdl, launch_pdl=pdl,
    )
    return out
