"""Weight-streaming GEMM for decode batches: ``x @ weight.T (+ bias)`` with ``x`` a few
rows (``[M, K]``, M <= 256 tokens) and ``weight`` a large ``[N, K]`` matrix.

Why it exists: at decode batch sizes a linear layer does ``M`` multiply-adds per weight
element it reads, so its time is the weight's bytes over HBM bandwidth. On an H100 cuBLAS
reaches 2.0-2.65 TB/s on the Nemotron-H-8B and Granite-4.0-H shapes at M = 64, against
about 3.0 TB/s for a copy; a decode step is mostly such layers.

How: each program owns ``block_n`` weight rows and ``block_m`` tokens and computes the
transposed tile ``out.T[block_n, block_m] = W_tile @ x_tile.T``, so the weight rows fill
the matrix unit's wide side (Hopper's wgmma takes 64 rows per warp group) and the few
tokens its narrow side (16 and up). One ``block_m`` tile normally holds the whole batch
(``block_m`` = next power of two >= M), so every weight byte is read once.

TMA (``SkinnyConfig.tma``, Hopper and later, `tma_fits`): both tiles loaded by the Tensor
Memory Accelerator, the batch one M tile; the same tiling with pointer loads otherwise.

Split-K: when ``N / block_n`` programs cannot fill the GPU, the K range is split into
``split_k`` parts. Each part writes its fp32 partial tile to a workspace
``[split_k, M, N]`` and a second small kernel sums the parts in a fixed order, adds the
bias and casts, so the same inputs always give the same bits. Given ``counters``, the
last part of each tile to finish does that sum in the GEMM's own launch instead (same
order, same bits; an atomic counter per tile, set back to zero).

Without the second kernel at all (`skinny_parts`): the parts are returned unsummed
(`SplitParts`) for the kernel that reads the output next to sum them, as the fused
add-and-norm does (`avmp.kernels.triton.rms_norm.add_rms_norm`), with the same bits.

Equal runs (``SkinnyConfig.programs``, `balanced_config`): a fixed number of programs,
each streaming an equal run of all tiles' K steps, so 133 tiles on 132 SMs take no
second wave; tiles two programs share are summed as the fold sums a split K's parts.
Measured slower than one program per tile on an H100 (docs/design-kernels.md).

A conv epilogue (`ConvEpilogue`): the Mamba decode conv step on some output columns,
applied as they are stored (the in_proj's xBC), its state shifted in place.

An activation epilogue (`ActEpilogue`): the MLP activation applied to the output tile
before it is stored, ``relu(out)²`` or ``silu(out)`` times the product of a second
weight whose rows the same program streams (a gated MLP's up beside its gate), with the
roundings of the GEMM's store followed by `avmp.kernels.triton.activations`.

No host sync and no data-dependent allocation, so a call can be captured in a CUDA graph
(the workspace is a plain ``torch.empty`` per call, served from the graph's pool).

Dependent launches (``pdl=True``, Hopper and later): the GEMMs of a decode step are each
tens of microseconds, and each starts from an idle memory pipeline after the kernel
before it has drained. As a programmatic dependent launch a program lets the next kernel
start at once, and, before it waits for the kernel before it, asks the L2 cache for the
first ``prefetch_bytes`` of each of its weight rows (``cp.async.bulk.prefetch.L2``): its
weights depend on no earlier kernel, so their loading overlaps the previous kernel's tail
and the launch. The prefetch is a hint; it changes no result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

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
    compute_capability,
    dot_precision,
    next_power_of_2,
    num_sms,
    upcast_dot,
)
from avmp.kernels.triton.activations import activate

# Block sizes are tl.dot tile sides: powers of two, 16 at least (its smallest operand).
MIN_BLOCK = 16
MAX_BLOCK_M = 256  # a decode batch; larger M takes several M tiles (weights re-read)
MAX_BLOCK_N = 256
MAX_BLOCK_K = 512
MAX_SPLIT_K = 64
MAX_PROGRAMS = 1 << 16
NUM_WARPS = (1, 2, 4, 8, 16)
# Columns of out one program of the split-K reduction sums.
REDUCE_BLOCK = 512

# default_config's rules (see its docstring).
TARGET_PROGRAMS_PER_SM = 2
MIN_K_BLOCKS_PER_SPLIT = 4
DEFAULT_MAX_SPLIT_K = 16
PIPELINE_BUDGET_BYTES = 128 << 10  # one program's staged tiles; H100 has 227 KiB per SM
MAX_DEFAULT_STAGES = 4
# `balanced_config`: one program per SM, so its pipeline may take most of the SM's
# shared memory (5 stages of a 64-row batch's 64 x 128 bf16 tiles)
BALANCED_STAGE_BYTES = 160 << 10
# `decode_config`'s long parts: past a split in two, K is split further only while each
# part keeps DECODE_PART_STEPS K steps, and such parts stream through DEEP_SPLIT_STAGES
# stages (at most DEEP_SPLIT_BYTES of staged tiles: 192 KiB for 64 rows, within an H100's
# 227 KiB per SM)
DECODE_PART_STEPS = 16
DEEP_SPLIT_STAGES = 6
DEEP_SPLIT_BYTES = 192 << 10
MAX_BALANCED_STAGES = 8


class ConvEpilogue(NamedTuple):
    """A Mamba decode conv step (`avmp.kernels.triton.conv1d_update` with SiLU) that
    `skinny_linear` applies to output columns ``[start, start + channels)`` before it
    stores them: row ``i``'s history is read from conv state slot ``slot_idx[i]``,
    shifted one column in place with the new value, and the columns hold the conv's
    output (rows with a negative slot keep the linear's values and their states).

    ``state``: ``[slots, channels, columns]`` (any strides, ``columns >= d_conv - 1``);
    ``weight``: ``[channels, d_conv]``; ``bias``: optional ``[channels]``.
    """

    state: torch.Tensor
    slot_idx: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int


class ActEpilogue(NamedTuple):
    """An MLP activation that `skinny_linear` applies to its output tile before it
    stores it, where `avmp.kernels.triton.activations` would run after the linear:
    ``relu(out)²`` when ``up`` is None, else ``silu(out) * (x @ up.T + up_bias)`` with
    ``up`` (``[N, K]``, x's dtype, unit stride along K) a second weight whose rows the
    same program streams (a gated MLP's up projection beside its gate). Both products are
    rounded to x's dtype first, as two linears' outputs are, so the result has the bits
    of the linear(s) followed by the activation kernel. Needs an unsplit K.
    """

    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None


class SplitParts(NamedTuple):
    """A split-K call's output before its parts are summed (`skinny_parts`): ``parts``
    ``[split, M, N]`` fp32, the ``bias`` to add, and the output's ``dtype``. `total`
    sums them as the call would have; `avmp.kernels.triton.rms_norm.add_rms_norm` takes
    them as its ``delta`` and sums them itself."""

    parts: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    def total(self, pdl: bool = False) -> torch.Tensor:
        """The ``[M, N]`` output: the parts summed in order, the bias added, cast."""
        _, m, n = self.parts.shape
        out = torch.empty((m, n), dtype=self.dtype, device=self.parts.device)
        _reduce(self.parts, self.bias, out, pdl)
        return out


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiling of one skinny_linear launch.

    ``block_m`` x ``block_n`` is one program's output tile (tokens x weight rows),
    ``block_k`` the K step of its loop, ``split_k`` how many parts K is split into
    (1: no workspace, no second kernel). ``num_warps`` and ``num_stages`` go to Triton
    (``num_stages``: tiles in flight in the software pipeline). ``tma``: load the tiles
    with the Tensor Memory Accelerator (Hopper and later) where the call allows it
    (`tma_fits`), else the same tiling with pointer loads. ``programs`` > 0: that many
    programs share every tile's K steps in equal runs (`_skinny_stream_kernel`; needs
    ``split_k`` 1 and a call's ``counters``), so 133 tiles on 132 SMs take no second
    wave; 0: one program per tile and K part.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False
    programs: int = 0

    def __post_init__(self) -> None:
        for name, limit in (("block_m", MAX_BLOCK_M), ("block_n", MAX_BLOCK_N),
                            ("block_k", MAX_BLOCK_K)):
            _check_block(name, getattr(self, name), limit)
        if not _is_int(self.split_k) or not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"split_k must be an int in [1, {MAX_SPLIT_K}], got {self.split_k}")
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            raise ValueError(f"num_warps must be one of {NUM_WARPS}, got {self.num_warps}")
        if not _is_int(self.num_stages) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages}")
        if not isinstance(self.tma, bool):
            raise ValueError(f"tma must be a bool, got {self.tma!r}")
        if not _is_int(self.programs) or not 0 <= self.programs <= MAX_PROGRAMS:
            raise ValueError(f"programs must be an int in [0, {MAX_PROGRAMS}], got "
                             f"{self.programs}")
        if self.programs and self.split_k != 1:
            raise ValueError("programs (runs of K steps over the tiles) needs split_k 1")

    def to_dict(self) -> dict[str, int]:
        """The fields as JSON-ready ints (the benchmark saves its best configs so)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SkinnyConfig:
        """Inverse of ``to_dict``; unknown keys raise TypeError (``tma`` and ``programs``
        may be absent: results saved before they existed)."""
        return cls(**fields)

    def pipeline_bytes(self, element_size: int) -> int:
        """Shared memory the staged weight and activation tiles take (Triton adds a
        little for the epilogue): what bounds ``num_stages`` on a given GPU."""
        return self.num_stages * (self.block_n + self.block_m) * self.block_k * element_size


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_block(name: str, value: int, limit: int) -> None:
    if not _is_int(value) or value < MIN_BLOCK or value > limit or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{MIN_BLOCK}, {limit}], got {value}")


def default_block_m(m: int) -> int:
    """One M tile for the whole batch: the next power of two >= M (16 at least), capped
    at 256 (beyond it the batch takes several tiles)."""
    return min(next_power_of_2(m, MIN_BLOCK), MAX_BLOCK_M)


def default_split_k(num_tiles: int, num_k_blocks: int, num_sms: int) -> int:
    """The smallest power-of-two split giving ``TARGET_PROGRAMS_PER_SM`` programs per SM
    (so the last partial wave and per-program start-up are hidden behind others), with
    each part keeping ``MIN_K_BLOCKS_PER_SPLIT`` K steps at least so its pipeline fills."""
    most = min(DEFAULT_MAX_SPLIT_K, max(1, num_k_blocks // MIN_K_BLOCKS_PER_SPLIT))
    split = 1
    while num_tiles * split < TARGET_PROGRAMS_PER_SM * num_sms and split * 2 <= most:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, num_sms: int, element_size: int = 2) -> SkinnyConfig:
    """A config from simple rules, for shapes the benchmark has no measured entry for.

    - ``block_m``: the whole batch in one tile (``default_block_m``).
    - ``block_n`` = 64: the rows of one Hopper wgmma warp group; a 64 x 128 bf16 weight
      tile is 16 KiB per stage.
    - ``block_k``: 128 while the activation tile is small (block_m <= 64), else 64, so
      a stage stays near 16-40 KiB; halved for fp32.
    - ``num_stages``: as many stages as fit ``PIPELINE_BUDGET_BYTES`` (2 to 4): the
      weight bytes in flight per program are what streams at HBM speed.
    - ``num_warps``: 8 for output tiles of 128 x 64 and up, else 4.
    - ``split_k``: when ``N / block_n`` tiles cannot fill ~2 programs per SM
      (``default_split_k``), e.g. N = 4096 rows of a 21504-long K.
    """
    if min(m, n, k, num_sms, element_size) < 1:
        raise ValueError(f"m, n, k, num_sms and element_size must be >= 1, got "
                         f"{(m, n, k, num_sms, element_size)}")
    block_m, block_n = default_block_m(m), 64
    block_k = (128 if block_m <= 64 else 64) * 2 // max(2, element_size)
    stage_bytes = (block_n + block_m) * block_k * element_size
    num_stages = max(2, min(MAX_DEFAULT_STAGES, PIPELINE_BUDGET_BYTES // stage_bytes))
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    num_tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = default_split_k(num_tiles, triton.cdiv(k, block_k), num_sms)
    return SkinnyConfig(block_m, block_n, block_k, split_k, num_warps, num_stages)


def decode_config(m: int, n: int, k: int, num_sms: int, element_size: int = 2,
                  long_parts: bool = True) -> SkinnyConfig:  # fmt: skip
    """The engine's tiling for a decode step's linears, from Granite-4.0-H-Micro's four
    projections at 64 rows, each after a norm kernel, 36 times in a CUDA graph, as
    dependent launches on an H100 (session experiments; the engine's results in
    docs/BENCHMARKS.md, "Decode GEMMs of 2-64 rows as dependent launches" and "Split-K
    parts of 16 K steps"): 64 weight rows by 128 of K per tile, TMA loads; K split only
    while the programs stay within one per SM (every part re-reads the batch's
    activations and the parts are summed after); three stages in flight for an unsplit K.

    ``long_parts`` (the default): K is split in two where that stays within one program
    per SM, and further only while each part keeps ``DECODE_PART_STEPS`` K steps; such
    parts stream through ``DEEP_SPLIT_STAGES`` stages, shorter ones through four. With
    fewer programs than SMs each must draw more than its share of the bandwidth, which
    takes more loads in flight, and a long part keeps them in flight longer than its
    pipeline takes to fill (a 2,048-row output of K 4,096 on 132 SMs: 2 parts of 16 steps,
    64 programs, 6 stages; of K 8,192: 4 parts, 128 programs). Without: K split while the
    programs stay within one per SM (that output: 4 parts, 128 programs), four stages.
    """
    if min(m, n, k, num_sms, element_size) < 1:
        raise ValueError(f"m, n, k, num_sms and element_size must be >= 1, got "
                         f"{(m, n, k, num_sms, element_size)}")
    block_m, block_n = default_block_m(m), 64
    block_k = 128 * 2 // max(2, element_size)
    num_tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    steps = triton.cdiv(k, block_k)
    most = min(DEFAULT_MAX_SPLIT_K, max(1, steps // MIN_K_BLOCKS_PER_SPLIT))
    split = 1
    while num_tiles * split * 2 <= num_sms and split * 2 <= most:
        if long_parts and split > 1 and steps // (split * 2) < DECODE_PART_STEPS:
            break
        split *= 2
    stages = 3 if split == 1 else 4
    if long_parts and split > 1 and steps // split >= DECODE_PART_STEPS:
        stage_bytes = (block_n + block_m) * block_k * element_size
        stages = max(stages, min(DEEP_SPLIT_STAGES, DEEP_SPLIT_BYTES // stage_bytes))
    return SkinnyConfig(block_m, block_n, block_k, split, 4, stages, tma=True)


def balanced_config(m: int, n: int, k: int, num_sms: int,
                    element_size: int = 2) -> SkinnyConfig | None:  # fmt: skip
    """`decode_config`'s tiles over one program per SM (``programs``), each streaming an
    equal run of all tiles' K steps with ``BALANCED_STAGE_BYTES`` of tiles in flight,
    where one program per tile would leave a last partial wave: more tiles than SMs and
    not a whole number of waves (133 tiles of Granite-4.0-H's in_proj on 132 SMs). None
    where the decode tiling fills its waves or splits K."""
    config = decode_config(m, n, k, num_sms, element_size)
    num_tiles = tiles(m, n, config)
    if config.split_k > 1 or num_tiles <= num_sms or num_tiles % num_sms == 0:
        return None
    return replace(config, num_stages=deep_stages(config, element_size), programs=num_sms)


def deep_stages(config: SkinnyConfig, element_size: int = 2) -> int:
    """Pipeline stages for one program per SM: as many of ``config``'s tiles as
    ``BALANCED_STAGE_BYTES`` of shared memory hold (2 to ``MAX_BALANCED_STAGES``)."""
    stage_bytes = (config.block_n + config.block_m) * config.block_k * element_size
    return max(2, min(MAX_BALANCED_STAGES, BALANCED_STAGE_BYTES // stage_bytes))


# Largest prefetch one weight row asks for before the wait (bytes; a bulk prefetch's size
# is a 32-bit count of whole 16-byte units).
MAX_PREFETCH_BYTES = 1 << 20


@triton.jit
def _prefetch_rows_l2(row_ptrs, nbytes):
    """One bulk L2 prefetch of ``nbytes`` (> 0, a multiple of 16) from each pointer
    (16-byte aligned) of ``row_ptrs``; a hint that reads nothing into registers."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r",
        [row_ptrs.to(tl.pointer_type(tl.uint8)), nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _conv_step(
    val, offs_n, offs_m, M, N, out_dtype: tl.constexpr,
    cs_ptr, slot_ptr, cw_ptr, cb_ptr, conv_start, conv_channels,
    stride_css, stride_csc, stride_csw, stride_slot, stride_cwc, stride_cwk,
    COLUMNS: tl.constexpr, WIDTH: tl.constexpr, CONV_BIAS: tl.constexpr,
):
    """The decode conv step (`conv1d_update`, SiLU) of output columns ``[conv_start,
    conv_start + conv_channels)`` of a ``[BN, BM]`` tile ``val`` (fp32, before the
    store's rounding): each row's history read from its slot, shifted by one column with
    the new value appended, and the conv's output returned in those columns (padding rows,
    slot < 0, keep ``val`` and their states)."""
    ch = offs_n - conv_start
    in_conv = (ch >= 0) & (ch < conv_channels) & (offs_n < N)
    slot = tl.load(slot_ptr + offs_m * stride_slot, mask=offs_m < M, other=-1).to(tl.int64)
    live = in_conv[:, None] & (slot >= 0)[None, :]
    chc = tl.where(in_conv, ch, 0).to(tl.int64)
    rows = cs_ptr + tl.where(slot >= 0, slot, 0)[None, :] * stride_css + chc[:, None] * stride_csc
    new = val.to(out_dtype).to(cs_ptr.dtype.element_ty)  # the stored output, in the state's dtype
    conv = tl.zeros_like(val)
    for j in tl.static_range(COLUMNS + 1):  # column COLUMNS is the new input
        if j == COLUMNS:  # noqa: SIM108 (a compile-time branch: one load or none)
            e = new
        else:
            e = tl.load(rows + j * stride_csw, mask=live, other=0.0)
        if j >= COLUMNS + 1 - WIDTH:  # filter tap j - (COLUMNS + 1 - WIDTH)
            w = tl.load(cw_ptr + chc * stride_cwc + (j - (COLUMNS + 1 - WIDTH)) * stride_cwk,
                        mask=in_conv, other=0.0).to(tl.float32)  # fmt: skip
            conv += e.to(tl.float32) * w[:, None]
        if j >= 1:  # the history shifted one column to the left
            tl.debug_barrier()
            tl.store(rows + (j - 1) * stride_csw, e, mask=live)
    if CONV_BIAS:
        conv += tl.load(cb_ptr + chc, mask=in_conv, other=0.0).to(tl.float32)[:, None]
    return tl.where(live, conv * tl.sigmoid(conv), val)


@triton.jit
def _finish_tile(
    acc, acc_up, offs_n, offs_m, tile, pid_k, M, N, split_k,
    b_ptr, ub_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om, stride_on,
    cs_ptr, slot_ptr, cw_ptr, cb_ptr, conv_start, conv_channels,
    stride_css, stride_csc, stride_csw, stride_slot, stride_cwc, stride_cwk,
    HAS_BIAS: tl.constexpr, FOLD_PARTS: tl.constexpr, CONV: tl.constexpr,
    COLUMNS: tl.constexpr, WIDTH: tl.constexpr, CONV_BIAS: tl.constexpr,
    ACT: tl.constexpr, UP_BIAS: tl.constexpr,
):
    """Store a program's ``out.T`` tile ``acc`` ([BN, BM], fp32): with the bias into
    ``out`` when K is whole, else as part ``pid_k`` of the workspace ``[split_k, M, N]``.
    ``FOLD_PARTS``: the last part of a tile to arrive (a counter per tile in ``cnt_ptr``,
    zero between calls) sums every part in order, adds the bias and stores ``out``, the
    values `_split_k_reduce_kernel` would store, in this launch; it sets the counter back
    to zero. ``CONV``: `_conv_step` on the whole tile before it is stored. ``ACT``
    (K whole): 1 ``silu(acc) * acc_up``, 2 ``relu(acc)²`` (`ActEpilogue`), each product
    first rounded as its store would round it."""
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    dtype = out_ptr.dtype.element_ty
    if split_k == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        if ACT != 0:
            gate = acc.to(dtype).to(tl.float32)  # the bits a store, then a load, would give
            up = gate
            if ACT == 1:
                if UP_BIAS:
                    acc_up += tl.load(ub_ptr + offs_n, mask=offs_n < N,
                                      other=0.0).to(tl.float32)[:, None]  # fmt: skip
                up = acc_up.to(dtype).to(tl.float32)
            acc = activate(gate, up, dtype, ACT == 1)
        if CONV:
            acc = _conv_step(acc, offs_n, offs_m, M, N, dtype, cs_ptr, slot_ptr, cw_ptr,
                             cb_ptr, conv_start, conv_channels, stride_css, stride_csc,
                             stride_csw, stride_slot, stride_cwc, stride_cwk, COLUMNS, WIDTH,
                             CONV_BIAS)  # fmt: skip
        tl.store(out_ptrs, acc.to(dtype), mask=mask)
    else:
        ws_tile = ws_ptr + (offs_m.to(tl.int64) * N)[None, :] + offs_n[:, None]
        part_size = M.to(tl.int64) * N
        tl.store(ws_tile + pid_k * part_size, acc, mask=mask)
        if FOLD_PARTS:
            # every thread's part is stored before the count says so (release), and
            # the last program reads the others' parts from L2 after it (acquire)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == split_k - 1:
                total = tl.zeros_like(acc)
                for part in range(0, split_k):  # the reduce kernel's order
                    total += tl.load(ws_tile + part * part_size, mask=mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                if HAS_BIAS:
                    total += tl.load(b_ptr + offs_n, mask=offs_n < N,
                                     other=0.0).to(tl.float32)[:, None]  # fmt: skip
                if CONV:
                    total = _conv_step(total, offs_n, offs_m, M, N, dtype, cs_ptr, slot_ptr,
                                       cw_ptr, cb_ptr, conv_start, conv_channels, stride_css,
                                       stride_csc, stride_csw, stride_slot, stride_cwc,
                                       stride_cwk, COLUMNS, WIDTH, CONV_BIAS)  # fmt: skip
                tl.store(out_ptrs, total.to(dtype), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


# M, split_k and blocks_per_split stay runtime values: Triton would otherwise compile a
# kernel for each value equal to 1, and the benchmark sweeps them without recompiling.
@triton.jit(do_not_specialize=["M", "split_k", "blocks_per_split"])
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, split_k, blocks_per_split,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on,
    cs_ptr, slot_ptr, cw_ptr, cb_ptr, conv_start, conv_channels,
    stride_css, stride_csc, stride_csw, stride_slot, stride_cwc, stride_cwk,
    u_ptr, ub_ptr, stride_un,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, FOLD_PARTS: tl.constexpr,
    CONV: tl.constexpr, COLUMNS: tl.constexpr, WIDTH: tl.constexpr, CONV_BIAS: tl.constexpr,
    ACT: tl.constexpr, UP_BIAS: tl.constexpr,
):
    if USE_PDL:  # the next kernel may start; it waits for this one before reading our output
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N or M wrap onto valid ones, so the loads need no mask along them (the
    # stores are masked): full, vectorised weight loads on the hot path.
    rows_w = (offs_n % N).to(tl.int64)
    rows_x = (offs_m % M).to(tl.int64)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    kb_start = pid_k * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, num_k_blocks)
    k_base = kb_start.to(tl.int64) * BLOCK_K
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + (k_base + offs_k)[None, :]  # [BN, BK]
    u_ptrs = u_ptr + rows_w[:, None] * stride_un + (k_base + offs_k)[None, :]  # ACT == 1
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_base + offs_k)[None, :] * stride_xk
    if PREFETCH > 0:  # this part's first weight bytes of each row, asked of L2 early
        k_stop = tl.minimum(kb_end.to(tl.int64) * BLOCK_K, K)
        left = (k_stop - k_base) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
        size = tl.minimum(left // 16 * 16, PREFETCH).to(tl.int32)
        if size > 0:
            sizes = size + tl.zeros([BLOCK_N], dtype=tl.int32)
            _prefetch_rows_l2(w_ptr + rows_w * stride_wn + k_base, sizes)
            if ACT == 1:
                _prefetch_rows_l2(u_ptr + rows_w * stride_un + k_base, sizes)
    if USE_PDL:  # x is the previous kernel's output
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out.T tile
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # and up's (ACT == 1)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            w = tl.load(w_ptrs)  # [BN, BK]
            x = tl.load(x_ptrs)  # [BM, BK]
        else:
            in_k = offs_k[None, :] < K - kb * BLOCK_K
            w = tl.load(w_ptrs, mask=in_k, other=0.0)
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # [BN, BM]
        if ACT == 1:
            if EVEN_K:
                u = tl.load(u_ptrs)
            else:
                u = tl.load(u_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_K, other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            acc_up = tl.dot(u, tl.trans(x), acc_up, input_precision=PRECISION)
            u_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
    tile = pid_m * tl.num_programs(0) + pid_n
    _finish_tile(acc, acc_up, offs_n, offs_m, tile, pid_k, M, N, split_k, b_ptr, ub_ptr,
                 out_ptr, ws_ptr, cnt_ptr, stride_om, stride_on, cs_ptr, slot_ptr, cw_ptr,
                 cb_ptr, conv_start, conv_channels, stride_css, stride_csc, stride_csw,
                 stride_slot, stride_cwc, stride_cwk, HAS_BIAS, FOLD_PARTS, CONV, COLUMNS,
                 WIDTH, CONV_BIAS, ACT, UP_BIAS)  # fmt: skip


@triton.jit(do_not_specialize=["M", "split_k", "blocks_per_split"])
def _skinny_tma_kernel(
    x_desc, w_desc, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, split_k, blocks_per_split, stride_wn, stride_om, stride_on,
    cs_ptr, slot_ptr, cw_ptr, cb_ptr, conv_start, conv_channels,
    stride_css, stride_csc, stride_csw, stride_slot, stride_cwc, stride_cwk,
    u_desc, u_ptr, ub_ptr, stride_un,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr, FOLD_PARTS: tl.constexpr, CONV: tl.constexpr,
    COLUMNS: tl.constexpr, WIDTH: tl.constexpr, CONV_BIAS: tl.constexpr,
    ACT: tl.constexpr, UP_BIAS: tl.constexpr,
):
    """`_skinny_kernel` with both tiles loaded by the Tensor Memory Accelerator (the
    batch is one M tile; rows and columns past the tensors read as zeros)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    kb_start = pid_k * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, num_k_blocks)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if PREFETCH > 0:  # as in _skinny_kernel: this part's first weight bytes, early
        k_base = kb_start.to(tl.int64) * BLOCK_K
        k_stop = tl.minimum(kb_end.to(tl.int64) * BLOCK_K, K)
        left = (k_stop - k_base) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
        size = tl.minimum(left // 16 * 16, PREFETCH).to(tl.int32)
        if size > 0:
            rows = (offs_n % N).to(tl.int64)
            sizes = size + tl.zeros([BLOCK_N], dtype=tl.int32)
            _prefetch_rows_l2(w_ptr + rows * stride_wn + k_base, sizes)
            if ACT == 1:
                _prefetch_rows_l2(u_ptr + rows * stride_un + k_base, sizes)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out.T tile
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # and up's (ACT == 1)
    for kb in tl.range(kb_start, kb_end, num_stages=NUM_STAGES):
        w = w_desc.load([n0, kb * BLOCK_K])  # [BN, BK]
        x = x_desc.load([0, kb * BLOCK_K])  # [BM, BK]
        acc = tl.dot(w, tl.trans(x), acc)
        if ACT == 1:
            acc_up = tl.dot(u_desc.load([n0, kb * BLOCK_K]), tl.trans(x), acc_up)
    _finish_tile(acc, acc_up, offs_n, offs_m, pid_n, pid_k, M, N, split_k, b_ptr, ub_ptr,
                 out_ptr, ws_ptr, cnt_ptr, stride_om, stride_on, cs_ptr, slot_ptr, cw_ptr,
                 cb_ptr, conv_start, conv_channels, stride_css, stride_csc, stride_csw,
                 stride_slot, stride_cwc, stride_cwk, HAS_BIAS, FOLD_PARTS, CONV, COLUMNS,
                 WIDTH, CONV_BIAS, ACT, UP_BIAS)  # fmt: skip


@triton.jit(do_not_specialize=["M", "units"])
def _skinny_stream_kernel(
    x_desc, w_desc, x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, units, stride_xm, stride_xk, stride_wn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """The skinny GEMM over a fixed number of programs (`SkinnyConfig.programs`): the
    ``units`` K steps of all output tiles, tile after tile, cut into equal runs, one per
    program, so no program waits for a last partial wave. A tile whose K steps one
    program holds is stored whole; a tile two or more share is summed in the K order of
    its parts by the last of them to finish (`_finish_tile`'s counters), as a split K's
    fold does. Tiles load by TMA (``TMA``) or by pointers."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_steps = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    start = pid * units // programs
    end = (pid + 1) * units // programs
    if PREFETCH > 0:  # the first tile's weight bytes of this run, asked of L2 early
        tile = start // k_steps
        k_base = (start - tile * k_steps).to(tl.int64) * BLOCK_K
        k_stop = tl.minimum(tl.minimum(end - tile * k_steps, k_steps).to(tl.int64) * BLOCK_K, K)
        left = (k_stop - k_base) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
        size = tl.minimum(left // 16 * 16, PREFETCH).to(tl.int32)
        if size > 0:
            rows = ((tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            _prefetch_rows_l2(w_ptr + rows.to(tl.int64) * stride_wn + k_base,
                              size + tl.zeros([BLOCK_N], dtype=tl.int32))  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    unit = start
    while unit < end:
        tile = unit // k_steps
        kb_start = unit - tile * k_steps
        kb_end = tl.minimum(k_steps, end - tile * k_steps)
        n0 = (tile % tiles_n) * BLOCK_N
        m0 = (tile // tiles_n) * BLOCK_M
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out.T tile
        if TMA:
            for kb in tl.range(kb_start, kb_end, num_stages=NUM_STAGES):
                w = w_desc.load([n0, kb * BLOCK_K])  # [BN, BK]
                x = x_desc.load([m0, kb * BLOCK_K])  # [BM, BK]
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            rows_w = (offs_n % N).to(tl.int64)  # wrapped, as in _skinny_kernel
            rows_x = (offs_m % M).to(tl.int64)
            for kb in tl.range(kb_start, kb_end, num_stages=NUM_STAGES):
                offs_k = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
                w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]
                x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk
                if EVEN_K:
                    w = tl.load(w_ptrs)
                    x = tl.load(x_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0)
                    x = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        # the programs sharing this tile: those owning its first and its last K step
        first = ((tile * k_steps + 1) * programs - 1) // units
        last = ((tile + 1) * k_steps * programs - 1) // units
        _finish_tile(acc, acc, offs_n, offs_m, tile, pid - first, M, N, last - first + 1,
                     b_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om, stride_on,
                     out_ptr, out_ptr, out_ptr, out_ptr, 0, 0, 0, 0, 0, 0, 0, 0,
                     HAS_BIAS, True, False, 1, 1, False, 0, False)  # fmt: skip
        unit = (tile + 1) * k_steps


@triton.jit(do_not_specialize=["M", "split_k"])
def _split_k_reduce_kernel(
    ws_ptr, b_ptr, out_ptr, M, N, split_k, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for part in range(0, split_k):  # a fixed order: the sum's bits never change
        ws_row = (part * M + row).to(tl.int64) * N
        acc += tl.load(ws_ptr + ws_row + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None
) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    (m, k), n = x.shape, weight.shape[0]
    check_dtype("x", x, FLOAT_DTYPES)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] (x is [{m}, {k}]), got {tuple(weight.shape)}")
    if k > 1 and weight.stride(1) != 1:
        raise ValueError("weight must be contiguous along K (stride 1 in its last dimension)")
    if bias is not None:
        check_shape("bias", bias, (n,))
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if out is not None:
        check_shape("out", out, (m, n))
        if out.dtype != x.dtype:
            raise ValueError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    check_same_device(x=x, weight=weight, bias=bias, out=out)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
    pdl: bool = False,
    prefetch_bytes: int = 0,
    counters: torch.Tensor | None = None,
    conv: ConvEpilogue | None = None,
    act: ActEpilogue | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, what ``torch.nn.functional.linear`` computes.

    Args:
        x: ``[M, K]`` activations (fp16, bf16 or fp32), any strides.
        weight: ``[N, K]`` in x's dtype, contiguous along K (any row stride).
        bias: optional ``[N]`` in x's dtype.
        config: the tiling; ``default_config`` for this shape and device when None.
        out: optional ``[M, N]`` output in x's dtype (any strides), written in place.
        pdl: launch as a programmatic dependent launch (Hopper and later; see the
            module doc): the next kernel may start at once, and this one waits for the
            kernel before it only before reading ``x``.
        prefetch_bytes: with ``pdl``, bytes of each weight row (of each K part) asked of
            the L2 cache before that wait (rounded down to 16; 0: none). Needs a GPU
            with bulk prefetches and 16-byte aligned weight rows, else ignored.
        counters: optional int32 zeros (at least one per output tile, `tiles`): with a
            split K, the last part of each tile to finish sums the parts in this launch
            (no second kernel; the same bits) and sets its counter back to zero. Calls
            sharing one counters tensor must not run at the same time (one stream).
        conv: optional decode conv step on some output columns (`ConvEpilogue`); with a
            split K it needs ``counters`` (the last part of a tile applies it).
        act: optional MLP activation of the output (`ActEpilogue`): ``relu(out)²``, or
            ``silu(out)`` times a second weight's product; needs an unsplit K (one
            part: ``config.split_k`` 1, or K within one ``block_k``) and no ``conv``.

    Returns:
        ``out``, or a new ``[M, N]`` tensor in x's dtype; fp32 accumulation, and the
        same bits for the same inputs and config whatever ``split_k``.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit together.
    """
    _check_inputs(x, weight, bias, out)
    (m, k), n = x.shape, weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: the bias alone
        if act is not None:
            raise ValueError("an activation epilogue needs K >= 1")
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    if config is None:
        config = default_config(m, n, k, num_sms(x.device), x.element_size())
    up = None if act is None else act.up
    prefetch = _prefetch(prefetch_bytes, pdl, weight, up)
    if counters is not None:
        _check_counters(counters, tiles(m, n, config), x)
    if conv is not None:
        _check_conv(conv, m, n, x)
        if counters is None and splits_k(k, config):
            raise ValueError("a conv epilogue over a split K needs counters")
    if act is not None:
        _check_act(act, x, weight, bias, conv, config)
    if config.programs:
        if counters is None:
            raise ValueError("config.programs needs counters (a tile two programs share "
                             "is summed by the last)")
        if conv is not None or act is not None:
            raise ValueError("config.programs takes no conv or activation epilogue")
        _launch_stream(x, weight, bias, out, config, pdl, prefetch, counters)
        return out
    _launch(x, weight, bias, out, config, pdl, prefetch, counters, conv, act)
    return out


def skinny_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: SkinnyConfig,
    pdl: bool = False,
    prefetch_bytes: int = 0,
) -> SplitParts:
    """`skinny_linear` with a split K (``config.split_k`` > 1 over at least two K
    steps), its parts left unsummed: no second kernel here, the consumer sums them
    (`SplitParts`). The same bits as `skinny_linear` once summed.

    Raises:
        ValueError: what `skinny_linear` rejects, or a config that does not split K.
    """
    _check_inputs(x, weight, bias, None)
    (m, k), n = x.shape, weight.shape[0]
    if not splits_k(k, config) or config.programs or m == 0 or n == 0:
        raise ValueError(f"skinny_parts needs a config splitting K ({k}) over a non-empty "
                         f"output, got {config}")
    prefetch = _prefetch(prefetch_bytes, pdl, weight)
    # x stands in for the output, which a split K's programs never write (only the
    # workspace); x has its dtype, so no [M, N] tensor is allocated for nothing
    parts = _launch(x, weight, bias, x, config, pdl, prefetch, reduce=False)
    return SplitParts(parts, bias, x.dtype)


def stream_parts(units: int, programs: int, k_steps: int) -> int:
    """The most programs one tile of ``k_steps`` K steps is shared by when ``units`` K
    steps are cut into ``programs`` equal runs (the workspace's parts)."""
    shortest = units // programs
    return min(k_steps, programs, (k_steps - 2) // shortest + 2)


def splits_k(k: int, config: SkinnyConfig) -> bool:
    """Whether ``config`` cuts a K of ``k`` into more than one part."""
    return config.split_k > 1 and triton.cdiv(k, config.block_k) > 1


def _check_act(act: ActEpilogue, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, conv: ConvEpilogue | None,
               config: SkinnyConfig) -> None:  # fmt: skip
    if conv is not None:
        raise ValueError("an activation epilogue and a conv epilogue cannot share a call")
    if splits_k(x.shape[1], config):
        raise ValueError("an activation epilogue needs an unsplit K (config.split_k 1)")
    if act.up is None:
        if act.up_bias is not None:
            raise ValueError("up_bias without up: relu(out)² takes no second bias")
        return
    check_shape("act up", act.up, tuple(weight.shape))
    if act.up.dtype != x.dtype or (x.shape[1] > 1 and act.up.stride(1) != 1):
        raise ValueError(f"act up must be in x's dtype {x.dtype}, contiguous along K")
    if act.up_bias is not None:
        check_shape("act up_bias", act.up_bias, (weight.shape[0],))
        if act.up_bias.dtype != x.dtype:
            raise ValueError(f"act up_bias must have x's dtype {x.dtype}")
    check_same_device(x=x, up=act.up, up_bias=act.up_bias, bias=bias)


def _check_conv(conv: ConvEpilogue, m: int, n: int, x: torch.Tensor) -> None:
    channels = conv.weight.shape[0] if conv.weight.dim() == 2 else -1
    if conv.state.dim() != 3 or channels < 0:
        raise ValueError("conv state must be [slots, channels, columns] and its weight "
                         "[channels, d_conv]")
    check_conv_geometry(conv.state, channels, conv.weight, conv.bias)
    check_shape("conv slot_idx", conv.slot_idx, (m,))
    check_dtype("conv slot_idx", conv.slot_idx, INDEX_DTYPES)
    if not 0 <= conv.start <= n - channels:
        raise ValueError(f"conv columns [{conv.start}, {conv.start + channels}) must lie in "
                         f"the output's {n}")
    check_same_device(x=x, conv_state=conv.state, slot_idx=conv.slot_idx,
                      conv_weight=conv.weight, conv_bias=conv.bias)  # fmt: skip


def tiles(m: int, n: int, config: SkinnyConfig) -> int:
    """Output tiles of a ``[m, n]`` result under ``config`` (counters a call needs)."""
    return triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)


def _check_counters(counters: torch.Tensor, needed: int, x: torch.Tensor) -> None:
    if counters.dtype != torch.int32 or counters.dim() != 1 or not counters.is_contiguous():
        raise ValueError(f"counters must be a contiguous 1-D int32 tensor, got "
                         f"{counters.dtype} {tuple(counters.shape)}")
    if counters.numel() < needed:
        raise ValueError(f"counters must hold one per output tile ({needed}), got "
                         f"{counters.numel()}")
    check_same_device(x=x, counters=counters)


def tma_fits(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig) -> bool:
    """Whether a call can load its tiles by TMA: a Hopper or later GPU, 16-bit floats,
    the batch in one M tile, unit-stride rows starting on 16-byte boundaries."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.shape[0] > config.block_m or compute_capability(x.device)[0] < 9:
        return False
    size = x.element_size()
    return all(
        t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in (x, weight)
    )


def _prefetch(prefetch_bytes: int, pdl: bool, weight: torch.Tensor,
              up: torch.Tensor | None = None) -> int:  # fmt: skip
    """The bytes of each weight row a launch asks of L2 early: ``prefetch_bytes``
    (checked) rounded down to 16, or 0 without ``pdl`` or where ``weight`` (and ``up``,
    a second weight the programs stream) cannot be prefetched."""
    if not _is_int(prefetch_bytes) or not 0 <= prefetch_bytes <= MAX_PREFETCH_BYTES:
        raise ValueError(f"prefetch_bytes must be an int in [0, {MAX_PREFETCH_BYTES}], "
                         f"got {prefetch_bytes}")
    prefetchable = _can_prefetch(weight) and (up is None or _can_prefetch(up))
    return prefetch_bytes // 16 * 16 if pdl and prefetchable else 0


def _can_prefetch(weight: torch.Tensor) -> bool:
    """Bulk L2 prefetches of ``weight``'s rows: a Hopper or later GPU (not the Triton
    interpreter), rows starting on 16-byte boundaries."""
    row_bytes = weight.stride(0) * weight.element_size()
    return (
        weight.device.type == "cuda"
        and weight.data_ptr() % 16 == 0
        and row_bytes % 16 == 0
        and compute_capability(weight.device)[0] >= 9
    )


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, config: SkinnyConfig, pdl: bool = False,
            prefetch: int = 0, counters: torch.Tensor | None = None,
            conv: ConvEpilogue | None = None, act: ActEpilogue | None = None,
            reduce: bool = True) -> torch.Tensor:
    """Launch the GEMM (and the split-K reduce unless folded or not ``reduce``); returns
    the workspace (a split K's parts, or one unused element)."""
    (m, k), n = x.shape, weight.shape[0]
    num_k_blocks = triton.cdiv(k, config.block_k)
    blocks_per_split = triton.cdiv(num_k_blocks, config.split_k)
    split_k = triton.cdiv(num_k_blocks, blocks_per_split)  # no part left without K
    # With split_k == 1 the workspace is never touched: one element keeps a valid pointer.
    ws_shape = (split_k, m, n) if split_k > 1 else (1,)
    workspace = torch.empty(ws_shape, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    fold = split_k > 1 and counters is not None
    cnt = counters if fold else workspace  # never touched without FOLD_PARTS
    conv_args, conv_meta = _conv_args(conv, out)
    (up, up_bias), act_meta = _act_args(act, weight, bias_arg)
    if config.tma and tma_fits(x, weight, config) and tma_fits(x, up, config):
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])
        u_desc = w_desc if up is weight else TensorDescriptor.from_tensor(
            up, [config.block_n, config.block_k])  # fmt: skip
        _skinny_tma_kernel[(triton.cdiv(n, config.block_n), split_k)](
            TensorDescriptor.from_tensor(x, [config.block_m, config.block_k]), w_desc,
            weight, bias_arg, out, workspace, cnt, m, n, k, split_k, blocks_per_split,
            weight.stride(0), out.stride(0), out.stride(1), *conv_args,
            u_desc, up, up_bias, up.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, USE_PDL=pdl,
            PREFETCH=prefetch, FOLD_PARTS=fold, **conv_meta,
            **act_meta, num_warps=config.num_warps, launch_pdl=pdl,
        )  # fmt: skip
    else:
        _launch_pointers(x, weight, bias_arg, out, workspace, cnt, config, blocks_per_split,
                         split_k, bias is not None, pdl, prefetch, fold, conv_args,
                         {**conv_meta, **act_meta}, (up, up_bias, up.stride(0)))  # fmt: skip
    if split_k > 1 and not fold and reduce:
        _reduce(workspace, bias, out, pdl)
    return workspace


def _reduce(parts: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            pdl: bool) -> None:  # fmt: skip
    """`_split_k_reduce_kernel`: ``out = sum(parts) (+ bias)``, the parts in order."""
    split_k, m, n = parts.shape
    _split_k_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
        parts, bias if bias is not None else out, out, m, n, split_k, out.stride(0),
        out.stride(1), HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )


def _launch_stream(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor, config: SkinnyConfig, pdl: bool, prefetch: int,
                   counters: torch.Tensor) -> None:  # fmt: skip
    """`_skinny_stream_kernel` over ``config.programs`` programs (fewer when the call has
    fewer K steps than that)."""
    (m, k), n = x.shape, weight.shape[0]
    k_steps = triton.cdiv(k, config.block_k)
    units = tiles(m, n, config) * k_steps
    programs = min(config.programs, units)
    if (units + 1) * programs >= 1 << 31:  # the kernel's run bounds are int32 products
        raise ValueError(f"{units} K steps over {programs} programs overflow the kernel's "
                         f"int32 run bounds")
    parts = stream_parts(units, programs, k_steps)
    workspace = torch.empty((parts, m, n) if parts > 1 else (1,), dtype=torch.float32,
                            device=x.device)  # fmt: skip
    x_arg, w_arg = x, weight
    tma = config.tma and tma_fits(x, weight, config)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_arg = TensorDescriptor.from_tensor(x, [config.block_m, config.block_k])
        w_arg = TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])
    _skinny_stream_kernel[(programs,)](
        x_arg, w_arg, x, weight, bias if bias is not None else out, out, workspace, counters,
        m, n, k, units, x.stride(0), x.stride(1), weight.stride(0), out.stride(0),
        out.stride(1), HAS_BIAS=bias is not None, TMA=tma, EVEN_K=k % config.block_k == 0,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NUM_STAGES=config.num_stages, USE_PDL=pdl, PREFETCH=prefetch,
        num_warps=config.num_warps, launch_pdl=pdl,
    )


def _launch_pointers(
    x: torch.Tensor, weight: torch.Tensor, bias_arg: torch.Tensor, out: torch.Tensor,
    workspace: torch.Tensor, cnt: torch.Tensor, config: SkinnyConfig, blocks_per_split: int,
    split_k: int, has_bias: bool, pdl: bool, prefetch: int, fold: bool,
    conv_args: tuple[Any, ...], meta: dict[str, Any], act_args: tuple[Any, ...],
) -> None:
    (m, k), n = x.shape, weight.shape[0]
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split_k)
    _skinny_kernel[grid](
        x, weight, bias_arg, out, workspace, cnt, m, n, k, split_k, blocks_per_split,
        x.stride(0), x.stride(1), weight.stride(0), out.stride(0), out.stride(1), *conv_args,
        *act_args, HAS_BIAS=has_bias, EVEN_K=k % config.block_k == 0,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_PDL=pdl, PREFETCH=prefetch, FOLD_PARTS=fold, **meta,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )


def _act_args(
    act: ActEpilogue | None, weight: torch.Tensor, bias_arg: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The kernels' activation epilogue arguments: the up weight and its bias, and the
    compile-time ``ACT`` (0 none, 1 gated SiLU, 2 relu²) and ``UP_BIAS``. What the
    kernels never read (no gate, no up bias) is ``weight`` or ``bias_arg`` standing in."""
    up = weight if act is None or act.up is None else act.up
    up_bias = bias_arg if act is None or act.up_bias is None else act.up_bias
    kind = 0 if act is None else 2 if act.up is None else 1
    return (up, up_bias), {"ACT": kind, "UP_BIAS": act is not None and act.up_bias is not None}


def _conv_args(
    conv: ConvEpilogue | None, out: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The kernels' conv epilogue arguments: pointers, start, channels and strides, and
    the compile-time ``CONV``, ``COLUMNS``, ``WIDTH``, ``CONV_BIAS``. Without a conv the
    kernels never read them: ``out`` stands in for each pointer, zeros for the rest."""
    if conv is None:
        return (out, out, out, out, 0, 0, 0, 0, 0, 0, 0, 0), {
            "CONV": False, "COLUMNS": 1, "WIDTH": 1, "CONV_BIAS": False}
    state, weight = conv.state, conv.weight
    args = (state, conv.slot_idx, weight, weight if conv.bias is None else conv.bias,
            conv.start, weight.shape[0], *state.stride(), conv.slot_idx.stride(0),
            *weight.stride())  # fmt: skip
    meta = {"CONV": True, "COLUMNS": state.shape[2], "WIDTH": weight.shape[1],
            "CONV_BIAS": conv.bias is not None}  # fmt: skip
    return args, meta
