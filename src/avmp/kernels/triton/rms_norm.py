"""Fused RMS norms (plain, and Mamba2's gated and grouped one) in one launch each.

The engine's torch norms take six to ten elementwise launches each (upcast, square,
mean, rsqrt, scale, downcast, weight); a decode step of a 40-layer hybrid runs about a
hundred of them, and at small batches those launches, not bytes, set the step time.
These kernels compute the same function in one pass: fp32 statistics, then the weight
applied exactly as the torch modules apply it (after the downcast, in the activations'
dtype, or before it in fp32 for Nemotron-H's norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    gate_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_g,
    stride_o,
    eps,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_GATE: tl.constexpr,
    FP32_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * (g / (1.0 + tl.exp(-g)))
    mean = tl.sum(h * h, axis=0) / GROUP
    h = h * (1.0 / tl.sqrt(mean + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if FP32_WEIGHT:
        y = w.to(tl.float32) * h
    else:
        y = w.to(tl.float32) * h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    fp32_weight: bool = False,
) -> torch.Tensor:
    """RMS norm of ``x``'s last dimension (per group of ``group_size`` channels), of
    ``x * silu(gate)`` when a gate is given; output in the dtype torch's module gives.

    ``fp32_weight``: multiply by the weight in fp32 before the downcast (else after it,
    in the weight's and activations' product as torch computes ``weight * h.to(dtype)``).
    """
    size = x.shape[-1]
    group = group_size or size
    if size % group or weight.shape != (size,):
        raise ValueError(f"weight must be [{size}] and {size} a multiple of {group}")
    x2 = x.reshape(-1, size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    g2 = None
    if gate is not None:
        g2 = gate.reshape(-1, size)
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
    out_dtype = x.dtype if fp32_weight else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((x2.shape[0], size), dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0], size // group)](
            x2,
            x2 if g2 is None else g2,
            weight,
            out,
            x2.stride(0),
            0 if g2 is None else g2.stride(0),
            out.stride(0),
            float(eps),
            GROUP=group,
            BLOCK=next_power_of_2(group),
            HAS_GATE=g2 is not None,
            FP32_WEIGHT=fp32_weight,
            num_warps=8 if group >= 2048 else 4,
        )
    return out.reshape(*x.shape[:-1], size)
