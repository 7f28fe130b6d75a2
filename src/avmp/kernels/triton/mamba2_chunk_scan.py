"""Mamba2 prefill scan in its chunked, state-space-duality form (Mamba2 paper, arXiv
2405.21060), over a ragged batch, starting from and ending in each request's slot.

Each sequence's new tokens are cut into chunks of ``chunk_size`` that never straddle two
sequences (300 tokens with chunk 256: chunks of 256 and 44). Within a chunk the scan is
matrix products (tensor cores, fp32 accumulation); between chunks only the states pass
along. Five launches:

1. ``dt`` discretised and ``dA = dt * A`` summed cumulatively within each chunk
   (``[heads, T]`` fp32 each), and each chunk's decay ``exp(sum dA)`` (``[heads, chunks]``);
2. ``CB[t, g, j] = C[t] . B[start + j]`` for the tokens of each chunk, once per head group
   (``[T, groups, chunk_size]`` fp32);
3. each chunk's own end state ``sum_l decay(l -> end) * dt[l] * x[l] (x) B[l]``
   (``[chunks, heads, head_dim, d_state]`` fp32);
4. the state passing, sequential over a sequence's chunks and parallel over sequences,
   heads and state elements: from the slot's state (zeros for a fresh request), the
   state each chunk starts from is written to its entry (``[chunks, heads, head_dim,
   d_state]`` in x's dtype: launch 5's matrix unit reads it in that dtype anyway, so the
   rounding happens here, once, and launch 5 reads half the bytes of a bf16 model's fp32
   state), and the sequence's final state (fp32 throughout) to its slot. Its loads
   depend on no earlier load (the decays are launch 1's), so each is issued a chunk or
   two before it is needed;
5. the outputs: ``y[l] = exp(dA_cs[l]) C[l] . S_start + sum_{j<=l} CB[l, j]
   exp(dA_cs[l] - dA_cs[j]) dt[j] x[j] + D x[l]``, gated by ``silu(z)``.

``chunk_layout`` builds the chunk table on the device from the query offsets (no value is
read back by the host), so a step computes it once and every layer reuses it.

Each kernel's tile sizes, warps and pipeline stages are a value, `ScanTiles`; without one
the scan takes the entry of the tuned table shipped in ``tuned/`` for its GPU and shape
(written by ``benchmarks/scan_tune.py``), or the defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, NamedTuple

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    check_dtype,
    check_shape,
    discretise_dt,
    dot_precision,
    dtype_name,
    gpu_key,
    next_power_of_2,
    parse_tuned_entries,
    per_token_rows,
    read_packaged_table,
    strides,
    upcast_dot,
)
from avmp.kernels.triton.mamba2_varlen_scan import _check_inputs

# Launch options the kernels accept: tl.dot needs 16 or more along each side of a tile;
# 256 is a whole chunk of the largest chunk size in the zoo; Triton takes warps in powers
# of two, 16 (512 threads) at most here.
DOT_TILE_RANGE = (16, 256)
NUM_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8
# The tuned table, inside this package; see `tuned_tiles`.
TUNED_TABLE = ("tuned", "mamba2_chunk_scan.json")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KernelTiles:
    """The launch options of one of the scan's kernels: its tile sizes (the subclass's
    ``block_*`` fields, powers of two within ``BLOCK_RANGES``), warps per program and
    ``num_stages`` (how many loads Triton's software pipeline keeps in flight in the
    kernel's loops). Triton's own defaults (4 warps, 3 stages) unless tuned.

    A tile size is a cap: a smaller shape shrinks it to its next power of two (16 or more
    for the tiles of a matrix product), so one configuration serves every model."""

    num_warps: int = 4
    num_stages: int = 3
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {}

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            raise ValueError(f"{kind}.num_warps must be one of {NUM_WARPS}, got {self.num_warps!r}")
        if not _is_int(self.num_stages) or not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(
                f"{kind}.num_stages must be an int in [1, {MAX_STAGES}], got {self.num_stages!r}")
        for name, (low, high) in self.BLOCK_RANGES.items():
            value = getattr(self, name)
            if not _is_int(value) or value & (value - 1) or not low <= value <= high:
                raise ValueError(f"{kind}.{name} must be a power of two in [{low}, {high}], "
                                 f"got {value!r}")

    def label(self) -> str:
        """Short form for tables: ``tokens64 state64 w4 s3``."""
        blocks = " ".join(f"{name.removeprefix('block_')}{getattr(self, name)}"
                          for name in self.BLOCK_RANGES)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class DtCumsumTiles(KernelTiles):
    """dt's discretisation and cumulative sum: heads per program (a chunk's tokens are
    one tile, the chunk size rounded up to a power of two)."""

    block_heads: int = 8
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {"block_heads": (1, 64)}


@dataclass(frozen=True)
class CbTiles(KernelTiles):
    """``C . B`` within each chunk: a ``block_tokens`` square of it per program, summed
    over d_state in steps of ``block_state``."""

    block_tokens: int = 64
    block_state: int = 64
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "block_tokens": DOT_TILE_RANGE, "block_state": DOT_TILE_RANGE}


@dataclass(frozen=True)
class ChunkStateTiles(KernelTiles):
    """Each chunk's own end state: a ``block_p x block_state`` tile of it per program,
    summed over the chunk's tokens in steps of ``block_tokens``."""

    block_p: int = 64
    block_state: int = 64
    block_tokens: int = 64
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "block_p": DOT_TILE_RANGE, "block_state": DOT_TILE_RANGE,
        "block_tokens": DOT_TILE_RANGE}


@dataclass(frozen=True)
class StatePassingTiles(KernelTiles):
    """The state passing: ``block_flat`` elements of a head's state per program, each
    chunk's own state and decay read ``prefetch`` chunks ahead of their use (1 or 2:
    how many chunks' loads are in flight while the program waits for one; 2 unless
    tuned, the loop then unrolled twice)."""

    block_flat: int = 1024
    prefetch: int = 2
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {"block_flat": (32, 8192)}
    PREFETCH: ClassVar[tuple[int, ...]] = (1, 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.prefetch) or self.prefetch not in self.PREFETCH:
            raise ValueError(f"StatePassingTiles.prefetch must be one of {self.PREFETCH}, "
                             f"got {self.prefetch!r}")

    def label(self) -> str:
        """``flat1024 ahead2 w4 s3``."""
        return (f"flat{self.block_flat} ahead{self.prefetch} w{self.num_warps} "
                f"s{self.num_stages}")


@dataclass(frozen=True)
class ChunkScanTiles(KernelTiles):
    """The outputs: ``block_tokens`` rows x ``block_p`` columns per program, d_state in
    steps of ``block_state``, the rows' own chunk walked in steps of ``block_j`` tokens."""

    block_tokens: int = 64
    block_p: int = 64
    block_state: int = 64
    block_j: int = 64
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "block_tokens": DOT_TILE_RANGE, "block_p": DOT_TILE_RANGE,
        "block_state": DOT_TILE_RANGE, "block_j": DOT_TILE_RANGE}


@dataclass(frozen=True)
class ScanTiles:
    """The launch configuration of the scan's five kernels, one field per kernel in
    launch order (`SCAN_KERNELS`). The defaults are the untuned ones: 64-token tiles,
    64 x 64 state tiles, the state passing reading two chunks ahead, 4 warps and 3 stages
    everywhere."""

    dt_cumsum: DtCumsumTiles = field(default_factory=DtCumsumTiles)
    cb: CbTiles = field(default_factory=CbTiles)
    chunk_state: ChunkStateTiles = field(default_factory=ChunkStateTiles)
    state_passing: StatePassingTiles = field(default_factory=StatePassingTiles)
    chunk_scan: ChunkScanTiles = field(default_factory=ChunkScanTiles)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not KERNEL_TILES[f.name]:
                raise TypeError(f"ScanTiles.{f.name} must be a {KERNEL_TILES[f.name].__name__}, "
                                f"got {type(value).__name__}")

    def with_kernel(self, kernel: str, tiles: KernelTiles) -> ScanTiles:
        """A copy with ``kernel``'s launch options replaced by ``tiles``."""
        if kernel not in KERNEL_TILES:
            raise ValueError(f"unknown scan kernel {kernel!r}; known: {', '.join(SCAN_KERNELS)}")
        return replace(self, **{kernel: tiles})

    def to_dict(self) -> dict[str, dict[str, int]]:
        """JSON-ready: ``{kernel: {field: value}}`` (the tuned table stores it so)."""
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScanTiles:
        """Inverse of `to_dict`; a kernel left out keeps its defaults.

        Raises:
            ValueError: not a mapping, an unknown kernel or field, or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"tiles must be a mapping of kernel -> fields, got {data!r}")
        unknown = set(data) - set(KERNEL_TILES)
        if unknown:
            raise ValueError(f"unknown scan kernels {sorted(unknown)}; known: {SCAN_KERNELS}")
        kernels = {}
        for name, values in data.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"tiles of {name} must be a mapping, got {values!r}")
            try:
                kernels[name] = KERNEL_TILES[name](**values)
            except TypeError as error:  # an unknown field name
                raise ValueError(f"tiles of {name}: {error}") from None
        return cls(**kernels)


KERNEL_TILES: dict[str, type[KernelTiles]] = {
    "dt_cumsum": DtCumsumTiles,
    "cb": CbTiles,
    "chunk_state": ChunkStateTiles,
    "state_passing": StatePassingTiles,
    "chunk_scan": ChunkScanTiles,
}
SCAN_KERNELS = tuple(KERNEL_TILES)


class TunedKey(NamedTuple):
    """What a tuned table entry is for: a GPU (its name as `gpu_key` normalises it) and
    the scan's shape and dtype."""

    gpu: str
    chunk_size: int
    head_dim: int
    d_state: int
    dtype: str


_ENTRY_INTS = ("chunk_size", "head_dim", "d_state")


def parse_tuned_table(data: Any, source: str) -> dict[TunedKey, ScanTiles]:
    """The entries of a tuned table (``{"entries": [{gpu, command, chunk_size, head_dim,
    d_state, dtype, tiles, ...}]}``), by key; other fields of an entry are notes.

    Raises:
        ValueError: a malformed table or entry, or one key twice; the message names
            ``source`` and the entry.
    """
    return parse_tuned_entries(
        data, source, _ENTRY_INTS, ScanTiles.from_dict,
        lambda e: TunedKey(gpu_key(e["gpu"]), *(e[n] for n in _ENTRY_INTS), e["dtype"]),
    )


@functools.cache
def packaged_tuned_table() -> dict[TunedKey, ScanTiles]:
    """The tuned table shipped in this package, read once (empty when the file is absent).

    Raises:
        ValueError: the file is not a valid tuned table.
    """
    return read_packaged_table(TUNED_TABLE, parse_tuned_table)


def tuned_tiles(
    chunk_size: int, head_dim: int, d_state: int, dtype: torch.dtype | str,
    gpu_name: str | None, table: Mapping[TunedKey, ScanTiles] | None = None,
) -> ScanTiles:
    """The tiles ``table`` (the packaged one by default) holds for this shape on the GPU
    named ``gpu_name``; the defaults for a GPU or shape not in it, or off the GPU
    (``gpu_name`` None)."""
    if gpu_name is None:
        return ScanTiles()
    table = packaged_tuned_table() if table is None else table
    key = TunedKey(gpu_key(gpu_name), chunk_size, head_dim, d_state, dtype_name(dtype))
    return table.get(key, ScanTiles())


@functools.lru_cache(maxsize=256)
def _device_tiles(
    device: torch.device, chunk_size: int, head_dim: int, d_state: int, dtype: torch.dtype
) -> ScanTiles:
    """`tuned_tiles` for a tensor's device, cached: the engine calls the scan once per
    layer and step, and a device name is a driver call."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return tuned_tiles(chunk_size, head_dim, d_state, dtype, gpu)


class ChunkLayout(NamedTuple):
    """Where each chunk of a step lies, on the device.

    Attributes:
        chunk_seq: ``[max_chunks]`` int32 sequence of each chunk; -1 past the last chunk.
        chunk_start: ``[max_chunks]`` int32 first token of each chunk (any value where
            ``chunk_seq`` is -1).
        cu_chunks: ``[batch + 1]`` int32: sequence ``b`` owns chunks
            ``cu_chunks[b] : cu_chunks[b + 1]``, consecutive and in token order.
    """

    chunk_seq: torch.Tensor
    chunk_start: torch.Tensor
    cu_chunks: torch.Tensor


def max_chunks(num_tokens: int, num_seqs: int, chunk_size: int) -> int:
    """An upper bound of the chunks of ``num_seqs`` sequences holding ``num_tokens``
    tokens in all: each sequence adds at most one partial chunk."""
    return triton.cdiv(num_tokens, chunk_size) + num_seqs


def chunk_layout(
    query_start_loc: torch.Tensor,
    slot_idx: torch.Tensor,
    chunk_size: int,
    num_tokens: int,
    num_chunks: int | None = None,
) -> ChunkLayout:
    """The chunk table of a ragged batch, computed on the device without a host read.

    Sequences with a negative slot (padding, or rows another kernel serves) get no chunk.

    Args:
        query_start_loc: ``[batch + 1]`` token offsets of the sequences.
        slot_idx: ``[batch]`` state slots (negative: no chunk).
        chunk_size: tokens per chunk (the last chunk of a sequence may be shorter).
        num_tokens: rows of the step's token tensors (padding included).
        num_chunks: entries of the table; must bound the chunks of the sequences with a
            slot (default: `max_chunks` of the whole batch).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = slot_idx.shape[0]
    if num_chunks is None:
        num_chunks = max_chunks(num_tokens, batch, chunk_size)
    device = query_start_loc.device
    qsl = query_start_loc.long()
    lens = qsl[1:] - qsl[:-1]
    counts = torch.where(slot_idx >= 0, (lens + chunk_size - 1) // chunk_size, 0)
    cu = torch.zeros(batch + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=cu[1:])
    index = torch.arange(num_chunks, dtype=torch.long, device=device)
    seq = torch.searchsorted(cu[1:], index, right=True)  # [num_chunks], batch past the end
    owner = seq.clamp(max=max(batch - 1, 0))
    start = qsl[owner] + (index - cu[owner]) * chunk_size if batch else index
    chunk_seq = torch.where(seq < batch, seq, -1)
    return ChunkLayout(chunk_seq.int(), start.int(), cu.int())


@triton.jit
def _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr, chunk, CHUNK: tl.constexpr):
    """(sequence, first token, tokens) of ``chunk``; sequence -1 for an unused entry."""
    seq = tl.load(chunk_seq_ptr + chunk)
    start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
    seq_end = tl.load(qsl_ptr + tl.maximum(seq, 0) + 1).to(tl.int64)
    return seq, start, tl.minimum(start + CHUNK, seq_end) - start


@triton.jit
def _dt_cumsum_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, dt_ptr, a_ptr, dt_bias_ptr, dt_out_ptr, dacs_ptr,
    decay_ptr, stride_dtt, stride_dth, stride_a, stride_dtbias, stride_wh, stride_dh,
    dt_min, dt_max,
    HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DT_ROUND: tl.constexpr,
):
    chunk = tl.program_id(0)
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr, chunk, CHUNK)
    if seq < 0:
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    mask_h = offs_h < HEADS
    mask = mask_h[:, None] & (offs_l < length)[None, :]
    tokens = start + offs_l
    dt = tl.load(dt_ptr + tokens[None, :] * stride_dtt + offs_h[:, None] * stride_dth,
                 mask=mask, other=0.0).to(tl.float32)  # [H, L]
    dt_bias = tl.zeros((BLOCK_H, 1), dtype=tl.float32)
    if HAS_DT_BIAS:
        dt_bias += tl.load(dt_bias_ptr + offs_h * stride_dtbias, mask=mask_h,
                           other=0.0).to(tl.float32)[:, None]
    dt = discretise_dt(dt, dt_bias, dt_min, dt_max, dt_ptr.dtype.element_ty,
                       HAS_DT_BIAS, DT_SOFTPLUS, DT_ROUND)
    dt = tl.where(mask, dt, 0.0)
    a = tl.load(a_ptr + offs_h * stride_a, mask=mask_h, other=0.0).to(tl.float32)
    dacs = tl.cumsum(dt * a[:, None], axis=1)  # [H, L]
    out = offs_h[:, None] * stride_wh + tokens[None, :]
    tl.store(dt_out_ptr + out, dt, mask=mask)
    tl.store(dacs_ptr + out, dacs, mask=mask)
    # The chunk's whole decay, for the state passing: the cumsum at its last token, picked
    # out exactly (a sum of it and zeros).
    dacs_last = tl.sum(tl.where((offs_l == length - 1)[None, :], dacs, 0.0), axis=1)  # [H]
    tl.store(decay_ptr + offs_h * stride_dh + chunk, tl.exp(dacs_last), mask=mask_h)


@triton.jit
def _chunk_cb_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, b_ptr, c_ptr, cb_ptr,
    stride_bt, stride_bg, stride_bn, stride_ct, stride_cg, stride_cn, stride_cbt, stride_cbg,
    D_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    num_blocks: tl.constexpr = (CHUNK + BLOCK - 1) // BLOCK
    block_m = tl.program_id(2) // num_blocks
    block_n = tl.program_id(2) % num_blocks
    if block_n > block_m:  # above the diagonal: never read
        return
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr,
                                       tl.program_id(0), CHUNK)
    if (seq < 0) | (block_m * BLOCK >= length):
        return
    group = tl.program_id(1)
    offs_m = block_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = block_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < length
    mask_n = offs_n < length
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, D_STATE, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D_STATE
        c = tl.load(c_ptr + (start + offs_m)[:, None] * stride_ct + group * stride_cg
                    + kk[None, :] * stride_cn, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bt = tl.load(b_ptr + (start + offs_n)[None, :] * stride_bt + group * stride_bg
                     + kk[:, None] * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
            bt = bt.to(tl.float32)
        acc += tl.dot(c, bt, input_precision=PRECISION)  # [M, N]
    tl.store(cb_ptr + (start + offs_m)[:, None] * stride_cbt + group * stride_cbg
             + offs_n[None, :], acc, mask=mask_m[:, None] & (offs_n < CHUNK)[None, :])


@triton.jit
def _chunk_state_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, x_ptr, b_ptr, dt_w_ptr, dacs_ptr, states_ptr,
    stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn, stride_wh,
    stride_sc, stride_sh, stride_sp,
    HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr, chunk, CHUNK)
    if seq < 0:
        return
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    n_blocks: tl.constexpr = (D_STATE + BLOCK_N - 1) // BLOCK_N
    offs_p = (tl.program_id(2) // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tl.program_id(2) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_p = offs_p < HEAD_DIM
    mask_n = offs_n < D_STATE
    dacs_row = dacs_ptr + head * stride_wh
    dacs_end = tl.load(dacs_row + start + length - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, length, BLOCK_L):
        tokens = start + l0 + offs_l
        mask_l = l0 + offs_l < length
        xt = tl.load(x_ptr + tokens[None, :] * stride_xt + head * stride_xh
                     + offs_p[:, None] * stride_xp, mask=mask_p[:, None] & mask_l[None, :],
                     other=0.0)  # [P, L]
        b = tl.load(b_ptr + tokens[:, None] * stride_bt + group * stride_bg
                    + offs_n[None, :] * stride_bn, mask=mask_l[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)  # [L, N]
        dt = tl.load(dt_w_ptr + head * stride_wh + tokens, mask=mask_l, other=0.0)
        dacs = tl.load(dacs_row + tokens, mask=mask_l, other=0.0)
        # Masked on the exponent too: past the chunk's end it would grow without bound.
        weight = tl.where(mask_l, dt * tl.exp(tl.where(mask_l, dacs_end - dacs, 0.0)), 0.0)
        b = b * weight[:, None]
        if UPCAST:
            xt = xt.to(tl.float32)
        else:
            b = b.to(xt.dtype)
        acc += tl.dot(xt, b, input_precision=PRECISION)
    tl.store(states_ptr + chunk * stride_sc + head * stride_sh + offs_p[:, None] * stride_sp
             + offs_n[None, :], acc, mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _chunk_own_state(states_row, decay_row, chunk, end, offs, mask, stride_cc):
    """``chunk``'s own end state (its ``offs`` elements) and decay; zeros and 1 at or
    past ``end``, where nothing is read."""
    # Past the end it reads the last chunk (a valid row) and selects after the load: a
    # mask mixing the scalar flag into the vector is refused by newer interpreters.
    inside = chunk < end
    row = tl.maximum(tl.minimum(chunk, end - 1), 0)
    own = tl.load(states_row + row * stride_cc + offs, mask=mask, other=0.0)
    decay = tl.load(decay_row + row)
    return tl.where(inside, own, 0.0), tl.where(inside, decay, 1.0)


@triton.jit
def _pass_chunk(s, own, decay, states_row, entries_row, decay_row, chunk, end, offs, mask,
                stride_cc, stride_ec, AHEAD: tl.constexpr):
    """Store the state ``chunk`` starts from (``s``) in its entry, pass ``s`` through the
    chunk, then read the chunk ``AHEAD`` on into the registers ``own`` and ``decay`` held.
    At or past ``end`` it stores nothing and leaves ``s`` as it is (times 1, plus 0)."""
    if chunk < end:  # a branch, not a mask mixing the scalar in: see `_chunk_own_state`
        tl.store(entries_row + chunk * stride_ec + offs,
                 s.to(entries_row.dtype.element_ty), mask=mask)
    s = s * decay + own
    # Read after `own` is consumed, so the load can reuse its registers: a load into other
    # registers would be copied back at the loop's end, a copy that waits for the load.
    own, decay = _chunk_own_state(states_row, decay_row, chunk + AHEAD, end, offs, mask,
                                  stride_cc)
    return s, own, decay


@triton.jit
def _state_passing_kernel(
    state_ptr, slot_ptr, init_ptr, cu_ptr, decay_ptr, states_ptr, entries_ptr,
    stride_ss, stride_sh, stride_sp, stride_sn, stride_slot, stride_init, stride_dh,
    stride_cc, stride_ch, stride_ec, stride_eh,
    HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr, BLOCK_F: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
):
    b = tl.program_id(0)
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    if slot < 0:  # padding, or a row another kernel serves: touch nothing
        return
    head = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)  # flat (p, n) of the state
    mask = offs < HEAD_DIM * D_STATE
    slot_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                 + (offs // D_STATE) * stride_sp + (offs % D_STATE) * stride_sn)
    # int64: the chunk index addresses the chunk states (chunks x state elements).
    first = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    states_row = states_ptr + head * stride_ch
    entries_row = entries_ptr + head * stride_eh
    decay_row = decay_ptr + head * stride_dh
    # No load in the loop depends on another: each chunk's reads are issued PREFETCH
    # chunks before they are used (the loop unrolled PREFETCH times), so that many are in
    # flight at once.
    s = tl.load(slot_ptrs, mask=mask, other=0.0).to(tl.float32)
    own, decay = _chunk_own_state(states_row, decay_row, first, end, offs, mask, stride_cc)
    if PREFETCH == 2:
        own_odd, decay_odd = _chunk_own_state(states_row, decay_row, first + 1, end, offs,
                                              mask, stride_cc)
    if HAS_INIT_FLAGS:
        s = tl.where(tl.load(init_ptr + b * stride_init) != 0, s, 0.0)
    for chunk in range(first, end, PREFETCH):
        s, own, decay = _pass_chunk(s, own, decay, states_row, entries_row, decay_row, chunk,
                                    end, offs, mask, stride_cc, stride_ec, PREFETCH)
        if PREFETCH == 2:
            s, own_odd, decay_odd = _pass_chunk(s, own_odd, decay_odd, states_row, entries_row,
                                                decay_row, chunk + 1, end, offs, mask,
                                                stride_cc, stride_ec, 2)
    tl.debug_barrier()
    tl.store(slot_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_sources(
    acc, dacs_m, offs_m, rows_ld, lo, hi, start, head, group, cb_ptr, dacs_row, dt_row, x_ptr,
    stride_cbt, stride_cbg, stride_wh, stride_xt, stride_xh, stride_xp, offs_p, mask_p,
    CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, MASKED: tl.constexpr, EVEN_P: tl.constexpr,
    EVEN_J: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``acc += (CB masked by the decay segments) @ (dt x)`` over the chunk's tokens
    ``[lo, hi)`` in steps of ``BLOCK_J``. ``MASKED``: the diagonal blocks, with the causal
    mask and the ``hi`` bound; otherwise every row follows every token of every block
    (``hi - lo`` a multiple of ``BLOCK_J``, all before the block's first row), and
    nothing is masked but a ragged head_dim. ``EVEN_J``: the chunk size is a multiple of
    ``BLOCK_J``, so every tile of CB columns lies inside the rows' chunk."""
    offs_j = tl.arange(0, BLOCK_J)
    cb_rows = cb_ptr + rows_ld[:, None] * stride_cbt + group * stride_cbg
    for j0 in range(lo, hi, BLOCK_J):
        cols = j0 + offs_j
        x_ptrs = (x_ptr + (start + cols)[:, None] * stride_xt + head * stride_xh
                  + offs_p[None, :] * stride_xp)
        if MASKED:
            mask_j = cols < hi
            causal = (cols[None, :] <= offs_m[:, None]) & mask_j[None, :]
            # The causal mask is not the load's: a mask that varies along a row makes
            # every element its own load (the diagonal tiles then cost more than all the
            # tiles below them). The tile lies inside the rows' CB, so it is read whole;
            # what the mask hides (entries above the diagonal and past the chunk's end,
            # never written: any bits) is dropped by the `where`, never multiplied in.
            if EVEN_J:
                cb = tl.load(cb_rows + cols[None, :])  # [M, J]
            else:
                cb = tl.load(cb_rows + cols[None, :], mask=(cols < CHUNK)[None, :], other=0.0)
            dacs_j = tl.load(dacs_row + start + cols, mask=mask_j, other=0.0)
            dt_j = tl.load(dt_row + start + cols, mask=mask_j, other=0.0)
            decay = tl.exp(tl.where(causal, dacs_m[:, None] - dacs_j[None, :], 0.0))
            weight = tl.where(causal, cb * decay * dt_j[None, :], 0.0)
            if EVEN_P:  # noqa: SIM108 (constexpr branches: one of them is compiled)
                xj = tl.load(x_ptrs, mask=mask_j[:, None], other=0.0)  # [J, P]
            else:
                xj = tl.load(x_ptrs, mask=mask_j[:, None] & mask_p[None, :], other=0.0)
        else:
            cb = tl.load(cb_rows + cols[None, :])
            dacs_j = tl.load(dacs_row + start + cols)
            dt_j = tl.load(dt_row + start + cols)
            weight = cb * tl.exp(dacs_m[:, None] - dacs_j[None, :]) * dt_j[None, :]
            if EVEN_P:  # noqa: SIM108 (constexpr branches: one of them is compiled)
                xj = tl.load(x_ptrs)
            else:
                xj = tl.load(x_ptrs, mask=mask_p[None, :], other=0.0)
        if UPCAST:
            xj = xj.to(tl.float32)
        else:
            weight = weight.to(xj.dtype)
        acc += tl.dot(weight, xj, input_precision=PRECISION)
    return acc


@triton.jit
def _chunk_scan_kernel(
    chunk_seq_ptr, chunk_start_ptr, qsl_ptr, x_ptr, z_ptr, c_ptr, cb_ptr, dt_w_ptr, dacs_ptr,
    states_ptr, d_ptr, out_ptr,
    stride_xt, stride_xh, stride_xp, stride_zt, stride_zh, stride_zp,
    stride_ct, stride_cg, stride_cn, stride_cbt, stride_cbg, stride_wh,
    stride_sc, stride_sh, stride_sp, stride_d, stride_ot, stride_oh, stride_op,
    HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    m_blocks: tl.constexpr = (CHUNK + BLOCK_M - 1) // BLOCK_M
    EVEN_P: tl.constexpr = HEAD_DIM % BLOCK_P == 0
    EVEN_K: tl.constexpr = D_STATE % BLOCK_K == 0
    EVEN_J: tl.constexpr = CHUNK % BLOCK_J == 0
    chunk = (tl.program_id(0) // m_blocks).to(tl.int64)
    block_m = tl.program_id(0) % m_blocks
    seq, start, length = _chunk_bounds(chunk_seq_ptr, chunk_start_ptr, qsl_ptr, chunk, CHUNK)
    m0 = block_m * BLOCK_M
    if (seq < 0) | (m0 >= length):
        return
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < length
    mask_p = offs_p < HEAD_DIM
    rows = start + offs_m
    # Rows past the chunk's end read its last row's inputs (never stored): no row mask.
    rows_ld = start + tl.minimum(offs_m, length - 1)
    dacs_row = dacs_ptr + head * stride_wh
    dacs_m = tl.load(dacs_row + rows_ld)  # [M]

    # The state the chunk starts from, seen through C and decayed to each row.
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, D_STATE, BLOCK_K):
        kk = k0 + offs_k
        c_ptrs = c_ptr + rows_ld[:, None] * stride_ct + group * stride_cg + kk[None, :] * stride_cn
        s_ptrs = (states_ptr + chunk * stride_sc + head * stride_sh + offs_p[None, :] * stride_sp
                  + kk[:, None])
        if EVEN_K:  # noqa: SIM108 (constexpr branches: one of them is compiled)
            c = tl.load(c_ptrs)  # [M, K]
        else:
            c = tl.load(c_ptrs, mask=(kk < D_STATE)[None, :], other=0.0)
        if EVEN_K & EVEN_P:
            s = tl.load(s_ptrs)  # [K, P]
        else:
            s = tl.load(s_ptrs, mask=(kk < D_STATE)[:, None] & mask_p[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
            s = s.to(tl.float32)
        else:
            s = s.to(c.dtype)
        acc += tl.dot(c, s, input_precision=PRECISION)
    acc *= tl.exp(dacs_m)[:, None]

    # The chunk's own tokens up to each row: whole blocks before the first row unmasked,
    # then the diagonal ones.
    full_end = m0 // BLOCK_J * BLOCK_J
    m_end = tl.minimum(m0 + BLOCK_M, length)
    dt_row = dt_w_ptr + head * stride_wh
    acc = _scan_sources(
        acc, dacs_m, offs_m, rows_ld, 0, full_end, start, head, group, cb_ptr, dacs_row, dt_row,
        x_ptr, stride_cbt, stride_cbg, stride_wh, stride_xt, stride_xh, stride_xp, offs_p,
        mask_p, CHUNK, BLOCK_J, False, EVEN_P, EVEN_J, PRECISION, UPCAST,
    )
    acc = _scan_sources(
        acc, dacs_m, offs_m, rows_ld, full_end, m_end, start, head, group, cb_ptr, dacs_row,
        dt_row, x_ptr, stride_cbt, stride_cbg, stride_wh, stride_xt, stride_xh, stride_xp,
        offs_p, mask_p, CHUNK, BLOCK_J, True, EVEN_P, EVEN_J, PRECISION, UPCAST,
    )

    mask_mp = mask_m[:, None] & mask_p[None, :]
    if HAS_D:
        xm = tl.load(x_ptr + rows[:, None] * stride_xt + head * stride_xh
                     + offs_p[None, :] * stride_xp, mask=mask_mp, other=0.0).to(tl.float32)
        acc += xm * tl.load(d_ptr + head * stride_d).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * stride_zt + head * stride_zh
                    + offs_p[None, :] * stride_zp, mask=mask_mp, other=0.0).to(tl.float32)
        acc *= z * tl.sigmoid(z)
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_p[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=mask_mp)


def _tile(size: int, cap: int) -> int:
    """A tile of ``size`` elements: a power of two between 16 (tl.dot's minimum) and ``cap``."""
    return min(next_power_of_2(size, 16), cap)


def _check_layout(layout: ChunkLayout, batch: int) -> None:
    check_shape("layout.chunk_start", layout.chunk_start, tuple(layout.chunk_seq.shape))
    check_shape("layout.cu_chunks", layout.cu_chunks, (batch + 1,))
    if layout.chunk_seq.dim() != 1:
        raise ValueError("layout.chunk_seq must be one-dimensional")
    for name, t in zip(ChunkLayout._fields, layout, strict=True):
        check_dtype(f"layout.{name}", t, (torch.int32,))
        if not t.is_contiguous():
            raise ValueError(f"layout.{name} must be contiguous")


def mamba2_chunk_scan(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    query_start_loc: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    dt_round: bool = False,
    out: torch.Tensor | None = None,
    layout: ChunkLayout | None = None,
    tiles: ScanTiles | None = None,
) -> torch.Tensor:
    """Scan each request's new tokens through its Mamba2 state in chunks, in place in
    its slot: the same function as `mamba2_varlen_scan`, with the same arguments.

    Args:
        state: ``[num_slots, heads, head_dim, d_state]`` pool view (fp32, bf16 or fp16;
            any strides): each request's initial state, overwritten with its final state.
        slot_idx: ``[batch]`` slot per request (negative: left untouched, output rows
            included).
        query_start_loc: ``[batch + 1]`` offsets of each request's tokens in x.
        x: ``[T, heads, head_dim]``; dt: ``[T, heads]`` raw; A: ``[heads]``;
        B, C: ``[T, groups, d_state]`` in x's dtype; D, dt_bias: optional ``[heads]``;
        z: optional ``[T, heads, head_dim]`` gate.
        chunk_size: tokens per chunk (the model's ``chunk_size``).
        has_initial_state: optional ``[batch]``; where 0 the scan starts from zeros.
        dt_softplus, dt_limit, dt_round: dt's discretisation, as in `mamba2_varlen_scan`.
        out: optional ``[T, heads, head_dim]`` output, written in place.
        layout: the step's `chunk_layout` for this ``chunk_size`` (computed here, on the
            device, when None).
        tiles: the kernels' launch configuration; None: the packaged tuned table's for
            this shape on this GPU (`tuned_tiles`), else the defaults.

    Returns:
        ``out``, or a new tensor in x's dtype.
    """
    launches, out = chunk_scan_launches(
        state, slot_idx, query_start_loc, x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
        z=z, has_initial_state=has_initial_state, dt_softplus=dt_softplus, dt_limit=dt_limit,
        dt_round=dt_round, out=out, layout=layout, tiles=tiles,
    )  # fmt: skip
    for launch in launches.values():
        launch()
    return out


def chunk_scan_launches(
    state: torch.Tensor,
    slot_idx: torch.Tensor,
    query_start_loc: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    dt_round: bool = False,
    out: torch.Tensor | None = None,
    layout: ChunkLayout | None = None,
    tiles: ScanTiles | None = None,
) -> tuple[dict[str, Callable[[], None]], torch.Tensor]:
    """`mamba2_chunk_scan`'s five kernel launches, checked and bound to their buffers but
    not run, so that one kernel can be timed alone (the tiles sweep does): each reads
    what the launches before it wrote. Arguments as `mamba2_chunk_scan`.

    Returns:
        The launches by kernel (`SCAN_KERNELS`, in launch order; none when there is
        nothing to scan) and the output they write.
    """
    optional = {"D": D, "dt_bias": dt_bias, "z": z, "has_initial_state": has_initial_state}
    _check_inputs(state, slot_idx, query_start_loc, x, dt, A, B, C, optional)
    for name, t in (("B", B), ("C", C)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if out is None:
        out = torch.empty_like(x)
    check_shape("out", out, tuple(x.shape))
    batch, tokens = slot_idx.shape[0], x.shape[0]
    if layout is None:
        layout = chunk_layout(query_start_loc, slot_idx, chunk_size, tokens)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_layout(layout, batch)
    if tiles is None:
        tiles = _device_tiles(x.device, chunk_size, x.shape[2], state.shape[3], x.dtype)
    elif not isinstance(tiles, ScanTiles):
        raise TypeError(f"tiles must be a ScanTiles, got {type(tiles).__name__}")
    if batch == 0 or tokens == 0 or layout.chunk_seq.shape[0] == 0:
        return {}, out
    if has_initial_state is not None and has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.int8)  # same bytes, loadable
    work = _scan_buffers(x, layout.chunk_seq.shape[0], B.shape[1], state.shape[3], chunk_size)
    qsl, part = query_start_loc, functools.partial
    launches = {
        "dt_cumsum": part(_launch_dt_cumsum, layout, qsl, dt, A, dt_bias, work, chunk_size,
                          dt_softplus, dt_limit, dt_round, tiles.dt_cumsum),
        "cb": part(_launch_cb, layout, qsl, B, C, work["cb"], chunk_size, tiles.cb),
        "chunk_state": part(_launch_chunk_state, layout, qsl, x, B, work, chunk_size,
                            tiles.chunk_state),
        "state_passing": part(_launch_state_passing, layout, state, slot_idx,
                              has_initial_state, work, tiles.state_passing),
        "chunk_scan": part(_launch_chunk_scan, layout, qsl, x, z, C, D, work, out, chunk_size,
                           tiles.chunk_scan),
    }
    return launches, out


def _scan_buffers(
    x: torch.Tensor, num_chunks: int, groups: int, d_state: int, chunk_size: int
) -> dict[str, torch.Tensor]:
    """The intermediates: discretised dt and its chunk cumsum ``[heads, T]``, each
    chunk's decay ``exp(sum dA)`` ``[heads, chunks]``, CB ``[T, groups, chunk_size]`` and
    each chunk's own end state ``[chunks, heads, head_dim, d_state]``, all fp32, and the
    state each chunk starts from (same shape, x's dtype); all bounded by the step's
    tokens and sequences, not by the prompts' lengths."""
    tokens, heads, head_dim = x.shape
    f32 = {"dtype": torch.float32, "device": x.device}
    return {
        "dt": per_token_rows(heads, tokens, **f32),
        "dacs": per_token_rows(heads, tokens, **f32),
        "chunk_decay": per_token_rows(heads, num_chunks, **f32),
        "cb": torch.empty(tokens, groups, chunk_size, **f32),
        "states": torch.empty(num_chunks, heads, head_dim, d_state, **f32),
        "entries": torch.empty(num_chunks, heads, head_dim, d_state, dtype=x.dtype,
                               device=x.device),
    }


def _options(tiles: KernelTiles) -> dict[str, int]:
    return {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def _launch_dt_cumsum(
    layout: ChunkLayout, qsl: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    dt_bias: torch.Tensor | None, work: dict[str, torch.Tensor], chunk_size: int,
    dt_softplus: bool, dt_limit: tuple[float, float], dt_round: bool, tiles: DtCumsumTiles,
) -> None:
    heads = dt.shape[1]
    block_h = min(next_power_of_2(heads), tiles.block_heads)
    grid = (layout.chunk_seq.shape[0], triton.cdiv(heads, block_h))
    _dt_cumsum_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, dt, A, dt if dt_bias is None else dt_bias,
        work["dt"], work["dacs"], work["chunk_decay"], *dt.stride(), A.stride(0),
        *strides(dt_bias, 1), work["dt"].stride(0), work["chunk_decay"].stride(0),
        float(dt_limit[0]), float(dt_limit[1]),
        HEADS=heads, CHUNK=chunk_size, BLOCK_H=block_h, BLOCK_L=next_power_of_2(chunk_size),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, DT_ROUND=dt_round,
        **_options(tiles),
    )


def _launch_cb(
    layout: ChunkLayout, qsl: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    cb: torch.Tensor, chunk_size: int, tiles: CbTiles,
) -> None:
    groups, d_state = B.shape[1], B.shape[2]
    block = _tile(chunk_size, tiles.block_tokens)
    grid = (layout.chunk_seq.shape[0], groups, triton.cdiv(chunk_size, block) ** 2)
    _chunk_cb_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, B, C, cb, *B.stride(), *C.stride(),
        cb.stride(0), cb.stride(1),
        D_STATE=d_state, CHUNK=chunk_size, BLOCK=block,
        BLOCK_K=_tile(d_state, tiles.block_state),
        PRECISION=dot_precision(B.dtype), UPCAST=upcast_dot(B.dtype), **_options(tiles),
    )


def _launch_chunk_state(
    layout: ChunkLayout, qsl: torch.Tensor, x: torch.Tensor, B: torch.Tensor,
    work: dict[str, torch.Tensor], chunk_size: int, tiles: ChunkStateTiles,
) -> None:
    heads, head_dim = x.shape[1], x.shape[2]
    groups, d_state = B.shape[1], B.shape[2]
    block_p, block_n = _tile(head_dim, tiles.block_p), _tile(d_state, tiles.block_state)
    states = work["states"]
    grid = (layout.chunk_seq.shape[0], heads,
            triton.cdiv(head_dim, block_p) * triton.cdiv(d_state, block_n))
    _chunk_state_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, x, B, work["dt"], work["dacs"], states,
        *x.stride(), *B.stride(), work["dt"].stride(0), *states.stride()[:3],
        HEAD_DIM=head_dim, D_STATE=d_state, HEADS_PER_GROUP=heads // groups, CHUNK=chunk_size,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_L=_tile(chunk_size, tiles.block_tokens),
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype), **_options(tiles),
    )


def _launch_state_passing(
    layout: ChunkLayout, state: torch.Tensor, slot_idx: torch.Tensor,
    has_initial_state: torch.Tensor | None, work: dict[str, torch.Tensor],
    tiles: StatePassingTiles,
) -> None:
    heads, head_dim, d_state = state.shape[1:]
    block = min(next_power_of_2(head_dim * d_state), tiles.block_flat)
    states, entries, decay = work["states"], work["entries"], work["chunk_decay"]
    grid = (slot_idx.shape[0], heads, triton.cdiv(head_dim * d_state, block))
    _state_passing_kernel[grid](
        state, slot_idx, slot_idx if has_initial_state is None else has_initial_state,
        layout.cu_chunks, decay, states, entries,
        *state.stride(), slot_idx.stride(0), *strides(has_initial_state, 1),
        decay.stride(0), states.stride(0), states.stride(1), entries.stride(0),
        entries.stride(1),
        HEAD_DIM=head_dim, D_STATE=d_state, BLOCK_F=block, PREFETCH=tiles.prefetch,
        HAS_INIT_FLAGS=has_initial_state is not None, **_options(tiles),
    )


def _launch_chunk_scan(
    layout: ChunkLayout, qsl: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None,
    C: torch.Tensor, D: torch.Tensor | None, work: dict[str, torch.Tensor],
    out: torch.Tensor, chunk_size: int, tiles: ChunkScanTiles,
) -> None:
    heads, head_dim = x.shape[1], x.shape[2]
    groups, d_state = C.shape[1], C.shape[2]
    block_m, block_p = _tile(chunk_size, tiles.block_tokens), _tile(head_dim, tiles.block_p)
    entries, cb = work["entries"], work["cb"]
    grid = (layout.chunk_seq.shape[0] * triton.cdiv(chunk_size, block_m), heads,
            triton.cdiv(head_dim, block_p))
    _chunk_scan_kernel[grid](
        layout.chunk_seq, layout.chunk_start, qsl, x, x if z is None else z, C, cb,
        work["dt"], work["dacs"], entries, x if D is None else D, out,
        *x.stride(), *strides(z, 3), *C.stride(), cb.stride(0), cb.stride(1),
        work["dt"].stride(0), *entries.stride()[:3], *strides(D, 1), *out.stride(),
        HEAD_DIM=head_dim, D_STATE=d_state, HEADS_PER_GROUP=heads // groups, CHUNK=chunk_size,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_K=_tile(d_state, tiles.block_state),
        BLOCK_J=_tile(chunk_size, tiles.block_j), HAS_D=D is not None, HAS_Z=z is not None,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype), **_options(tiles),
    )
