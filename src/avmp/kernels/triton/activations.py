"""The MLP activations of a decode step in one launch each: ``silu(gate) * up`` (gated
MLPs: Granite-4.0-H's shared MLP, Bamba, Jamba, Falcon-H1) and ``relu(x)²`` (Nemotron-H).

In torch each is two elementwise launches; a 40-layer Granite decode step runs 80 of
them. Every intermediate is rounded to the activations' dtype where torch rounds it (the
activation's result, then the product), so the fused MLP computes the values the torch
modules compute.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import FLOAT_DTYPES, check_dtype, round_to

BLOCK = 1024


@triton.jit
def _activation_kernel(
    x_ptr, up_ptr, out_ptr, cols, stride_x, stride_u, stride_o,
    GATED: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # a dependent launch: the next kernel may start; wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = x
    if GATED:
        up = tl.load(up_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, activate(x, up, dtype, GATED).to(dtype),
             mask=mask)  # fmt: skip


@triton.jit
def activate(x, up, dtype: tl.constexpr, GATED: tl.constexpr):
    """``silu(x) * up`` (``GATED``) or ``relu(x)²`` of fp32 values that hold ``dtype``
    numbers, rounded to ``dtype`` where torch rounds (the activation, then the product;
    relu is exact); returned in fp32. `skinny_linear`'s activation epilogue uses it too."""
    if GATED:
        y = round_to(round_to(x / (1.0 + tl.exp(-x)), dtype) * up, dtype)
    else:
        r = tl.maximum(x, 0.0)
        y = round_to(r * r, dtype)
    return y


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: torch.Tensor, up: torch.Tensor | None, pdl: bool) -> torch.Tensor:
    check_dtype("x", x, FLOAT_DTYPES)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"up must match gate: {tuple(x.shape)} {x.dtype}, "
                         f"got {tuple(up.shape)} {up.dtype}")
    x2 = _rows(x)
    u2 = x2 if up is None else _rows(up)
    rows, cols = x2.shape
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows and cols:
        _activation_kernel[(rows, triton.cdiv(cols, BLOCK))](
            x2, u2, out, cols, x2.stride(0), u2.stride(0), out.stride(0),
            GATED=up is not None, BLOCK=BLOCK, USE_PDL=pdl, launch_pdl=pdl,
        )
    return out.reshape(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` as torch computes it in the inputs' dtype (one launch; ``pdl``:
    as a programmatic dependent launch, Hopper and later)."""
    return _launch(gate, up, pdl)


def relu_squared(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``relu(x)²`` as torch computes it in x's dtype (one launch; ``pdl`` as in
    `silu_mul`)."""
    return _launch(x, None, pdl)
