"""A decode step's linear layer with the elementwise work before it done in its prologue.

At one to a few rows a decode step is launches, not bytes: a 40-layer Granite-4.0-H step
runs about 420 kernels, and 157 of them are a norm or an activation whose only reader is
the linear right after it (the residual add and norm before each mixer and MLP, Mamba2's
gated norm before ``out_proj``, the MLP's ``act(gate) * up`` before its down projection).
Each of those costs a launch, a graph gap and a ramp of a few microseconds while moving
a few kilobytes. Here the linear computes its own input instead:

- ``norm_linear``: ``W @ norm(x + delta * scale)`` (delta optional), and the sum itself,
  written once for the residual stream;
- ``gated_norm_linear``: ``W @ norm(y * silu(gate))`` per group of channels;
- ``act_linear``: ``W @ (act(gate) * up)`` (SiLU) or ``W @ relu(x)²``.

Each program streams ``BLOCK_N`` weight rows against one activation row (weights are
read once from memory; the few rows of a small batch share them through L2). The
prologue's statistics (a group's sum of squares) are computed by every program from the
row, a few kilobytes read from L2, so no second launch is needed. Every intermediate is
rounded where the unfused modules round it (`rms_norm`, `activations`), so the linear
reads the very input the unfused path gives it; only the order of the fp32 accumulation
differs from cuBLAS's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    check_dtype,
    next_power_of_2,
    num_sms,
    round_to,
)

# Prologue kinds (the kernel's MODE).
NORM, GATED_NORM, SILU_MUL, RELU_SQUARED = 0, 1, 2, 3

# Rows up to which the engine takes these kernels over norm/activation + cuBLAS. One
# program a row streams the weights once per row (the rows share them only through L2),
# so the kernel is for the lone decode row, where launches cost the most; a tensor-core
# variant for up to 16 rows lost to the unfused pair (every program recomputes the
# prologue of every row), and was not kept.
MAX_ROWS = 1
# Widest row whose gated-norm statistics are computed from one load of the whole row.
WHOLE_ROW_LIMIT = 16384


@triton.jit
def _prologue_linear_kernel(
    x_ptr,
    aux_ptr,
    sum_ptr,
    nw_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_x,
    stride_a,
    stride_s,
    stride_w,
    stride_o,
    eps,
    scale,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    GROUPS_P2: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
    HAS_AUX: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP32_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    rows_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows_n < N
    w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * stride_w
    x_row = x_ptr + row * stride_x
    a_row = aux_ptr + row * stride_a
    ks = tl.arange(0, BLOCK_K)
    if USE_PDL:  # the next kernel may start; it waits for this one before reading our output
        tl.extra.cuda.gdc_launch_dependents()
    # The weights depend on no earlier kernel: the first tile is read before the wait.
    w_next = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < K)[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    groups = tl.arange(0, GROUPS_P2)
    invs = tl.full([GROUPS_P2], 1.0, tl.float32)
    if MODE == 1 and WHOLE_ROW:  # every group's statistics from one round of loads
        whole = tl.arange(0, GROUPS_P2 * GROUP)  # the row is whole groups, a power of two
        hs = tl.load(x_row + whole).to(tl.float32)
        gs = tl.load(a_row + whole).to(tl.float32)
        hs = hs * (gs / (1.0 + tl.exp(-gs)))
        squares = tl.sum(tl.reshape(hs * hs, (GROUPS_P2, GROUP)), axis=1)
        invs = 1.0 / tl.sqrt(squares / GROUP + eps)
    elif MODE == 0 or MODE == 1:  # each group's statistics, from the whole group
        for g in range(0, K // GROUP):
            whole = g * GROUP + tl.arange(0, GROUP_P2)
            m = tl.arange(0, GROUP_P2) < GROUP
            hs = tl.load(x_row + whole, mask=m, other=0.0).to(tl.float32)
            if MODE == 0 and HAS_AUX:  # x + delta * scale, rounded as torch rounds it
                ds = tl.load(a_row + whole, mask=m, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    ds = round_to(ds * scale, dtype)
                hs = round_to(hs + ds, dtype)
                if tile == 0:
                    tl.store(sum_ptr + row * stride_s + whole, hs.to(dtype), mask=m)
            if MODE == 1:
                gs = tl.load(a_row + whole, mask=m, other=0.0).to(tl.float32)
                hs = hs * (gs / (1.0 + tl.exp(-gs)))
            mean = tl.sum(hs * hs, axis=0) / GROUP
            invs = tl.where(groups == g, 1.0 / tl.sqrt(mean + eps), invs)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        ahead = k0 + BLOCK_K + ks  # the next tile's loads go out before this tile's math
        w_next = tl.load(
            w_rows + ahead[None, :], mask=mask_n[:, None] & (ahead < K)[None, :], other=0.0
        )
        cols = k0 + ks
        mk = cols < K
        h = tl.load(x_row + cols, mask=mk, other=0.0).to(tl.float32)
        if MODE == 0 and HAS_AUX:
            d = tl.load(a_row + cols, mask=mk, other=0.0).to(tl.float32)
            if HAS_SCALE:
                d = round_to(d * scale, dtype)
            h = round_to(h + d, dtype)
        if MODE == 1:
            gt = tl.load(a_row + cols, mask=mk, other=0.0).to(tl.float32)
            h = h * (gt / (1.0 + tl.exp(-gt)))
        if MODE == 0 or MODE == 1:  # a tile lies in one group (BLOCK_K divides GROUP)
            h = h * tl.sum(tl.where(groups == k0 // GROUP, invs, 0.0), axis=0)
            nw = tl.load(nw_ptr + cols, mask=mk, other=0.0).to(tl.float32)
            if not FP32_WEIGHT:  # the weight applied after the downcast
                h = round_to(h, dtype)
            a = round_to(nw * h, dtype)
        elif MODE == 2:  # silu(gate) rounded, times up, rounded
            up = tl.load(a_row + cols, mask=mk, other=0.0).to(tl.float32)
            a = round_to(round_to(h / (1.0 + tl.exp(-h)), dtype) * up, dtype)
        else:  # relu(x)², relu exact
            r = tl.maximum(h, 0.0)
            a = round_to(r * r, dtype)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + rows_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def tiles(n: int, k: int, num_sms: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)``: eight weight rows a program; short K steps when
    there are programs enough to keep every SM streaming, long ones (more bytes in
    flight a program) when the matrix has few rows and a long K. Chosen from a sweep on
    an H100 over Granite-4.0-H-Micro's decode linears; ``benchmarks/prologue_linear.py``
    times the default against its sweep per linear."""
    if triton.cdiv(n, 8) >= 4 * num_sms:
        return 8, 256, 4
    if k >= 8192:
        return 8, 2048, 8
    return 8, 1024, 8 if k >= 4096 else 4


def _whole_row(k: int, group: int) -> bool:
    """Whether the gated norm's statistics load the row at once (several groups, both
    their size and number powers of two, the row small enough for registers): one
    round of loads, where a loop over the groups waits on each in turn."""
    groups = k // group
    return (
        groups > 1
        and group == next_power_of_2(group)
        and groups == next_power_of_2(groups)
        and k <= WHOLE_ROW_LIMIT
    )


def tile_fits_groups(k: int, group: int) -> bool:
    """Whether a K tile of at least 16 channels lies inside one norm group."""
    return k == group or (k % group == 0 and group & -group >= 16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()



def _launch(
    mode: int,
    x: torch.Tensor,
    aux: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    scale: float | None = None,
    group: int | None = None,
    fp32_weight: bool = False,
    block: tuple[int, int, int] | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_dtype("x", x, FLOAT_DTYPES)
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.ndim != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}], got {tuple(weight.shape)}")
    if aux is not None and (aux.shape != x.shape or aux.dtype != x.dtype):
        raise ValueError(f"{tuple(aux.shape)} {aux.dtype} must match x: {tuple(x.shape)} {x.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    group = group or k
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm weight must be [{k}], got {tuple(norm_weight.shape)}")
    x2 = _rows(x)
    a2 = x2 if aux is None else _rows(aux)
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x2) if mode == NORM and aux is not None else None
    if not tile_fits_groups(k, group):
        raise ValueError(f"groups of {group} channels do not split into tiles of 16")
    block_n, block_k, warps = block or tiles(n, k, num_sms(x.device))
    # a K tile lies in one group
    block_k = min(block_k, next_power_of_2(k) if k == group else group & -group)
    if rows and n:
        _prologue_linear_kernel[(rows, triton.cdiv(n, block_n))](
            x2, a2, x2 if total is None else total,
            weight if norm_weight is None else norm_weight,
            weight, weight if bias is None else bias, out,
            n, k, x2.stride(0), a2.stride(0), 0 if total is None else total.stride(0),
            weight.stride(0), out.stride(0), float(eps), 1.0 if scale is None else float(scale),
            MODE=mode, GROUP=group, GROUP_P2=next_power_of_2(group),
            GROUPS_P2=next_power_of_2(k // group), WHOLE_ROW=_whole_row(k, group),
            HAS_AUX=aux is not None, HAS_SCALE=scale is not None, FP32_WEIGHT=fp32_weight,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            USE_PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )  # fmt: skip
    out = out.reshape(*x.shape[:-1], n)
    return out, None if total is None else total.reshape(x.shape)


def norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    scale: float | None = None,
    fp32_weight: bool = False,
    block: tuple[int, int, int] | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``linear(rms_norm(s))`` with ``s = x + delta * scale`` (``s = x`` without a delta),
    the norm as `avmp.kernels.triton.rms_norm.add_rms_norm` computes it.

    Returns:
        ``(s, out)``; ``s`` is None without a delta (it is ``x``).
    """
    out, total = _launch(NORM, x, delta, weight, bias, norm_weight, eps, scale, None,
                         fp32_weight, block, pdl)  # fmt: skip
    return total, out


def gated_norm_linear(
    y: torch.Tensor,
    gate: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    group_size: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``linear(rms_norm(y * silu(gate)))``, the norm per group of ``group_size``
    channels as `avmp.kernels.triton.rms_norm.rms_norm` computes it with a gate."""
    return _launch(GATED_NORM, y, gate, weight, bias, norm_weight, eps, None, group_size,
                   False, block, pdl)[0]  # fmt: skip


def act_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``linear(silu(x) * up)`` with ``up``, ``linear(relu(x)²)`` without, the activation
    as `avmp.kernels.triton.activations` computes it."""
    mode = SILU_MUL if up is not None else RELU_SQUARED
    return _launch(mode, x, up, weight, bias, block=block, pdl=pdl)[0]
