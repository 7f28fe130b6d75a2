"""Fused RMS norms (plain, and Mamba2's gated and grouped one) in one launch each, and
the plain norm with the residual addition before it folded in (`add_rms_norm`).

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

from avmp.kernels.triton._common import next_power_of_2, round_to
from avmp.kernels.triton.skinny_linear import SplitParts


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    gate_ptr,
    w_ptr,
    out_ptr,
    delta_ptr,
    sum_ptr,
    stride_x,
    stride_g,
    stride_o,
    stride_d,
    stride_s,
    eps,
    scale,
    pb_ptr,
    num_parts,
    stride_p,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_GATE: tl.constexpr,
    FP32_WEIGHT: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PARTS: tl.constexpr,
    PARTS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # a dependent launch: the next kernel may start; wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:  # x + delta * scale, each rounded to x's dtype as torch rounds them
        if PARTS:  # delta as a split K's fp32 parts: summed and cast as the reduce does
            d = tl.zeros([BLOCK], dtype=tl.float32)
            for part in range(0, num_parts):
                d += tl.load(delta_ptr + part * stride_p + row * stride_d + cols, mask=mask,
                             other=0.0)  # fmt: skip
            if PARTS_BIAS:
                d += tl.load(pb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            d = d.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            d = round_to(d * scale, x_ptr.dtype.element_ty)
        h = round_to(h + d, x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, h.to(sum_ptr.dtype.element_ty), mask=mask)
    if HAS_GATE:
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * (g / (1.0 + tl.exp(-g)))
    mean = tl.sum(h * h, axis=0) / GROUP
    h = h * (1.0 / tl.sqrt(mean + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if FP32_WEIGHT:
        y = w.to(tl.float32) * h
    else:
        y = w.to(tl.float32) * round_to(h, x_ptr.dtype.element_ty)
    y = round_to(y, out_ptr.dtype.element_ty)  # exact: the cast below then rounds nothing
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    fp32_weight: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """RMS norm of ``x``'s last dimension (per group of ``group_size`` channels), of
    ``x * silu(gate)`` when a gate is given; output in the dtype torch's module gives.

    ``fp32_weight``: multiply by the weight in fp32 before the downcast (else after it,
    in the weight's and activations' product as torch computes ``weight * h.to(dtype)``).
    ``pdl``: launch as a programmatic dependent launch (Hopper and later), which lets
    the next kernel start at once and waits for the one before it.
    """
    return _launch(x, weight, eps, gate, group_size, fp32_weight, None, None, pdl)[0]


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | SplitParts,
    weight: torch.Tensor,
    eps: float,
    scale: float | None = None,
    fp32_weight: bool = False,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta * scale`` (scale optional) and the RMS norm of ``s``, in one launch.

    ``s`` is rounded to x's dtype as torch's ``x + delta * scale`` rounds it (the product,
    then the sum), so the norm sees the very values the unfused modules see. ``delta``
    may be a split-K GEMM's unsummed parts (`SplitParts`, x's dtype): summed here
    exactly as `SplitParts.total` sums them, one launch fewer.

    Returns:
        ``(s, norm(s))``.
    """
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if isinstance(delta, SplitParts) and (delta.dtype != x.dtype or x.dim() != 2):
        raise ValueError(f"split parts must sum to x's dtype {x.dtype} over [rows, "
                         f"channels], got {delta.dtype} over {x.dim()} dimensions")
    out, total = _launch(x, weight, eps, None, None, fp32_weight, delta, scale, pdl)
    assert total is not None
    return total, out


def _rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` as ``[rows, size]`` with unit stride along the channels."""
    t2 = t.reshape(-1, size)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None,
    group_size: int | None,
    fp32_weight: bool,
    delta: torch.Tensor | SplitParts | None,
    scale: float | None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    size = x.shape[-1]
    group = group_size or size
    if size % group or weight.shape != (size,):
        raise ValueError(f"weight must be [{size}] and {size} a multiple of {group}")
    x2 = _rows(x, size)
    g2 = None if gate is None else _rows(gate, size)
    parts = delta if isinstance(delta, SplitParts) else None
    d2 = None if delta is None else parts.parts[0] if parts is not None else _rows(delta, size)
    out_dtype = x.dtype if fp32_weight else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((x2.shape[0], size), dtype=out_dtype, device=x.device)
    total = None if d2 is None else torch.empty_like(x2)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0], size // group)](
            x2,
            x2 if g2 is None else g2,
            weight,
            out,
            x2 if d2 is None else d2,
            out if total is None else total,
            x2.stride(0),
            0 if g2 is None else g2.stride(0),
            out.stride(0),
            0 if d2 is None else d2.stride(0),
            0 if total is None else total.stride(0),
            float(eps),
            1.0 if scale is None else float(scale),
            out if parts is None or parts.bias is None else parts.bias,
            0 if parts is None else parts.parts.shape[0],
            0 if parts is None else parts.parts.stride(0),
            GROUP=group,
            BLOCK=next_power_of_2(group),
            HAS_GATE=g2 is not None,
            FP32_WEIGHT=fp32_weight,
            HAS_DELTA=d2 is not None,
            HAS_SCALE=scale is not None,
            PARTS=parts is not None,
            PARTS_BIAS=parts is not None and parts.bias is not None,
            USE_PDL=pdl,
            num_warps=8 if group >= 2048 else 4,
            launch_pdl=pdl,
        )
    shape = (*x.shape[:-1], size)
    return out.reshape(shape), None if total is None else total.reshape(shape)
