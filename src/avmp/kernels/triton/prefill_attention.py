"""Causal prefill attention over page-major KV for a ragged batch (write-then-attend).

The engine first writes the new tokens' K and V into their pages, then calls this: each
request's queries (packed one after another, ``query_start_loc`` marking the starts)
attend to every cached key of that request up to their own position, earlier chunks of
a chunked prefill included. Keys are gathered token by token through the block table,
so any ``block_size`` works and no page has to be copied out of the pool.

The kernel follows FlashAttention-2's forward (Dao, arXiv 2307.08691): a program owns a
tile of ``block_m`` query rows, walks the keys in tiles of ``block_n`` with an online
softmax (fp32 running max, sum and accumulator), and:

- packs query heads: the rows of a tile are ``query_block`` tokens x ``pack`` query
  heads that share one KV head (GQA), so each K/V tile is loaded once for all of them
  (vLLM's Triton unified attention packs heads the same way);
- splits the key loop: the key tiles that every row of the tile sees in full run
  without the causal mask and without bounds checks; only the last one or two (the
  diagonal) are masked;
- starts the longest tiles first: the query-block axis (the tile table's, in the tiled
  launch) is the grid's slowest and walked backwards, so a request's tiles with the
  most keys are launched before its short ones, which fill the tail (in the host-grid
  launch, across requests too; the tile table runs request after request, the last
  first).

Tile sizes, warps and pipeline stages are a value, `AttentionTiles`; without one the
kernel takes the entry of the tuned table shipped in ``tuned/prefill_attention.json``
for its GPU and (head_dim, GQA group, dtype), written by ``benchmarks/attn_tune.py``, or
the defaults (today's 64 x 32 tiles, 4 warps, 3 stages).

The launch grid is either the query blocks of every request up to ``max_query_len`` (a
host bound; programs past a request's queries exit at once) or a device-side tile table
(`attention_tiles`, one entry per block of ``query_block`` queries of one request),
whose length follows from the step's token and request counts alone: a CUDA graph of a
padded prefill or mixed step replays it whatever its requests' lengths, and its grid
grows with the tokens, not with requests x tokens. The table must be built with the
query block the launch uses (`query_block`); the launch checks it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_same_device,
    check_shape,
    dot_precision,
    dtype_name,
    gpu_key,
    next_power_of_2,
    parse_tuned_entries,
    read_packaged_table,
    upcast_dot,
)
from avmp.kernels.triton.mamba2_chunk_scan import (
    DOT_TILE_RANGE,
    KernelTiles,
    chunk_layout,
    max_chunks,
)

LOG2E = 1.4426950408889634
# A packed tile keeps at least this many query tokens (a tl.dot side is 16 or more).
MIN_QUERY_BLOCK = 16
# The tuned table, inside this package; see `tuned_attention_tiles`.
TUNED_TABLE = ("tuned", "prefill_attention.json")


@dataclass(frozen=True)
class AttentionTiles(KernelTiles):
    """The kernel's launch options: ``block_m`` query rows per program (tokens x packed
    heads, see `pack_heads`), ``block_n`` keys per step of its loop, warps, and
    ``num_stages`` (the loads Triton's software pipeline keeps in flight in the key
    loop). The defaults are the untuned kernel's: 64 x 32 tiles, 4 warps, 3 stages."""

    block_m: int = 64
    block_n: int = 32
    BLOCK_RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "block_m": DOT_TILE_RANGE, "block_n": DOT_TILE_RANGE}

    def to_dict(self) -> dict[str, int]:
        """JSON-ready (the tuned table stores it so)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> AttentionTiles:
        """Inverse of `to_dict`; a field left out keeps its default.

        Raises:
            ValueError: not a mapping, an unknown field, or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"tiles must be a mapping of field -> value, got {data!r}")
        try:
            return cls(**data)
        except TypeError as error:  # an unknown field name
            raise ValueError(f"tiles: {error}") from None


def pack_heads(tiles: AttentionTiles, group: int) -> int:
    """Query heads per program: the largest divisor of the GQA ``group`` that leaves the
    tile ``MIN_QUERY_BLOCK`` tokens or more (1, one head per program, when none does)."""
    most = max(1, tiles.block_m // MIN_QUERY_BLOCK)
    return max(d for d in range(1, min(group, most) + 1) if group % d == 0)


def query_block(tiles: AttentionTiles, group: int) -> int:
    """Query tokens per program (and per entry of the tile table) for a GQA ``group``."""
    return tiles.block_m // pack_heads(tiles, group)


class TunedKey(NamedTuple):
    """What a tuned table entry is for: a GPU (its name as `gpu_key` normalises it),
    the head dim, the GQA group (query heads per KV head) and the dtype."""

    gpu: str
    head_dim: int
    group: int
    dtype: str


_ENTRY_INTS = ("head_dim", "group")


def parse_tuned_table(data: Any, source: str) -> dict[TunedKey, AttentionTiles]:
    """The entries of a tuned table (``{"entries": [{gpu, command, head_dim, group,
    dtype, tiles, ...}]}``), by key; other fields of an entry are notes. The Mamba2
    scan's table format (`_common.parse_tuned_entries`), with this kernel's key.

    Raises:
        ValueError: a malformed table or entry, or one key twice; the message names
            ``source`` and the entry.
    """
    return parse_tuned_entries(
        data, source, _ENTRY_INTS, AttentionTiles.from_dict,
        lambda e: TunedKey(gpu_key(e["gpu"]), e["head_dim"], e["group"], e["dtype"]),
    )


@functools.cache
def packaged_tuned_table() -> dict[TunedKey, AttentionTiles]:
    """The tuned table shipped in this package, read once (empty when the file is absent).

    Raises:
        ValueError: the file is not a valid tuned table.
    """
    return read_packaged_table(TUNED_TABLE, parse_tuned_table)


def tuned_attention_tiles(
    head_dim: int, group: int, dtype: torch.dtype | str, gpu_name: str | None,
    table: Mapping[TunedKey, AttentionTiles] | None = None,
) -> AttentionTiles:
    """The tiles ``table`` (the packaged one by default) holds for this shape on the GPU
    named ``gpu_name``; the defaults for a GPU or shape not in it, or off the GPU
    (``gpu_name`` None)."""
    if gpu_name is None:
        return AttentionTiles()
    table = packaged_tuned_table() if table is None else table
    key = TunedKey(gpu_key(gpu_name), head_dim, group, dtype_name(dtype))
    return table.get(key, AttentionTiles())


@functools.lru_cache(maxsize=64)
def _device_tiles(device: torch.device, head_dim: int, group: int,
                  dtype: torch.dtype) -> AttentionTiles:
    """`tuned_attention_tiles` for a tensor's device, cached: the engine calls the kernel
    once per attention layer and step, and a device name is a driver call."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return tuned_attention_tiles(head_dim, group, dtype, gpu)


def launch_tiles(q: torch.Tensor, k_cache: torch.Tensor) -> AttentionTiles:
    """The tiles a launch without ``config`` uses for these queries and this cache."""
    group = q.shape[1] // max(1, k_cache.shape[2])
    return _device_tiles(q.device, q.shape[2], group, q.dtype)


@triton.jit
def _load_kv(ptrs, mask_t, mask_d, ROWS_MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A ``[N, D]`` tile of gathered key (or value) rows, masked only where it must be."""
    if ROWS_MASKED:
        if EVEN_D:
            tile = tl.load(ptrs, mask=mask_t[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
    else:
        if EVEN_D:  # noqa: SIM108 (constexpr branches: one of them is compiled)
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _attend(
    acc, l_i, m_i, q, query_pos, lo, hi, k_base, v_base, bt_row,
    stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, stride_btp,
    scale_log2, offs_d, mask_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The online softmax over keys ``[lo, hi)`` in tiles of ``BLOCK_N``. ``MASKED``:
    apply the causal mask and the ``hi`` bound (the diagonal tiles); otherwise every row
    sees every key of every tile (``hi - lo`` a multiple of ``BLOCK_N``)."""
    for t0 in range(lo, hi, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        mask_t = offs_t < hi
        if MASKED:
            page = tl.load(bt_row + (offs_t // PAGE) * stride_btp, mask=mask_t, other=0)
        else:
            page = tl.load(bt_row + (offs_t // PAGE) * stride_btp)
        page = page.to(tl.int64)
        in_page = offs_t % PAGE
        k = _load_kv(k_base + (page * stride_kp + in_page * stride_kt)[:, None]
                     + offs_d[None, :] * stride_kd, mask_t, mask_d, MASKED, EVEN_D)
        v = _load_kv(v_base + (page * stride_vp + in_page * stride_vt)[:, None]
                     + offs_d[None, :] * stride_vd, mask_t, mask_d, MASKED, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [M, N] fp32
        if MASKED:
            visible = mask_t[None, :] & (offs_t[None, :] <= query_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1) * scale_log2)
        if MASKED:  # noqa: SIM108 (a constexpr branch: one of them is compiled)
            # Every row sees key full_end, so m_new is finite from the first masked tile
            # on; kept safe anyway: a row of -inf would give exp2(-inf - -inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every row sees every key of the tile: m_new is finite
            m_safe = m_new
        p = tl.exp2(scores * scale_log2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# the block table's row stride is the step's widest table, which changes from step to
# step: specialised, it would compile this kernel again for each class it falls in
@triton.jit(do_not_specialize=["stride_btb"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr, tile_seq_ptr, tile_start_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ot, stride_oh, stride_od,
    scale_log2,
    GROUP: tl.constexpr, PACK: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILED: tl.constexpr,
):
    # program (head pack, tile) or (head pack, request, query block); the last axis is
    # walked backwards so that the tiles with the most keys start first
    TOKENS: tl.constexpr = BLOCK_M // PACK
    head_pack = tl.program_id(0)
    if TILED:  # the tile names its request and first query
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        b = tl.load(tile_seq_ptr + tile)
        if b < 0:  # past the step's last tile
            return
        m_block = (tl.load(tile_start_ptr + tile) - tl.load(qsl_ptr + b)) // TOKENS
    else:
        b = tl.program_id(1)
        m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if m_block * TOKENS >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    # row r of the tile: token r // PACK of the block, query head r % PACK of the pack
    rows = tl.arange(0, BLOCK_M)
    offs_m = m_block * TOKENS + rows // PACK
    heads = head_pack * PACK + rows % PACK
    kv_head = head_pack * PACK // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = (offs_m < q_len) & (rows < TOKENS * PACK)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + (q_rows * stride_qt + heads * stride_qh)[:, None] + offs_d[None, :] * stride_qd,
        mask=mask_md, other=0.0,
    )  # [M, D]
    if UPCAST:
        q = q.to(tl.float32)
    first_pos = ctx - q_len + m_block * TOKENS  # the tile's first query's position
    query_pos = ctx - q_len + offs_m
    kv_end = tl.minimum(ctx, first_pos + TOKENS)
    # keys before full_end (whole key tiles, <= first_pos + 1 <= kv_end) are visible to
    # every row of the tile
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, query_pos, 0, full_end, k_base, v_base, bt_row,
        stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, stride_btp,
        scale_log2, offs_d, mask_d, PAGE, BLOCK_N, False, HEAD_DIM == BLOCK_D, PRECISION,
        UPCAST,
    )
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, query_pos, full_end, kv_end, k_base, v_base, bt_row,
        stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd, stride_btp,
        scale_log2, offs_d, mask_d, PAGE, BLOCK_N, True, HEAD_DIM == BLOCK_D, PRECISION,
        UPCAST,
    )
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_rows * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty), mask=mask_md,
    )


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be [T, Hq, D] and k_cache [num_pages, block_size, Hkv, D]")
    num_heads, head_dim = q.shape[1], q.shape[2]
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads are not a multiple of {k_cache.shape[2]}")
    check_dtype("q", q, FLOAT_DTYPES)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q, k_cache and v_cache must share one dtype")
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_pages]")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("context_lens", context_lens)):
        check_dtype(name, t, INDEX_DTYPES)
    check_same_device(q=q, k=k_cache, v=v_cache, bt=block_tables, qsl=query_start_loc,
                      ctx=context_lens)


class AttentionTileTable(NamedTuple):
    """A step's tile table on the device (`attention_tiles`).

    Attributes:
        tile_seq: ``[max_tiles]`` int32 request of each tile; -1 past the last tile.
        tile_start: ``[max_tiles]`` int32 first query row of each tile.
        query_block: query tokens per tile (host-side): the launch must use tiles of
            this many tokens (`query_block` of its `AttentionTiles`).
    """

    tile_seq: torch.Tensor
    tile_start: torch.Tensor
    query_block: int


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    tiles: AttentionTileTable | None = None,
    config: AttentionTiles | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their paged KV.

    Args:
        q: ``[T, Hq, D]`` queries of all requests, packed; any strides.
        k_cache, v_cache: ``[num_pages, block_size, Hkv, D]`` pool views (any strides),
            already holding the new tokens' K and V.
        block_tables: ``[B, max_pages]`` page ids per request, in token order.
        query_start_loc: ``[B + 1]`` offsets of each request's queries in ``q``.
        context_lens: ``[B]`` cached tokens per request, the new ones included: query
            ``i`` of request ``b`` sits at ``context_lens[b] - q_len[b] + i`` and sees
            every position up to its own.
        scale: softmax scale.
        max_query_len: an upper bound of ``q_len`` over the batch (host-side, so the
            launch needs no sync); programs past a request's queries exit at once.
            Ignored when ``tiles`` is given.
        out: optional ``[T, Hq, D]`` output, written in place.
        tiles: the step's `attention_tiles`: one program per tile and head pack, so the
            grid follows from the table's length alone.
        config: the launch's tiles, warps and stages; None: the tuned table's for this
            GPU and shape (`launch_tiles`), else the defaults.

    Returns:
        ``out``, or a new tensor in q's dtype. fp32 accumulation.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices, or a tile table built for
            another query block than the launch's.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape))
    batch, num_heads, head_dim = context_lens.shape[0], q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[2]
    config = launch_tiles(q, k_cache) if config is None else config
    if not isinstance(config, AttentionTiles):
        raise TypeError(f"config must be an AttentionTiles, got {type(config).__name__}")
    pack, tokens = pack_heads(config, group), query_block(config, group)
    if tiles is not None:
        if tiles.query_block != tokens:
            raise ValueError(f"the tile table has {tiles.query_block}-token tiles; this launch "
                             f"({config.label()}, GQA group {group}) takes {tokens}")
        grid: tuple[int, ...] = (num_heads // pack, tiles.tile_seq.shape[0])
        tile_seq, tile_start = tiles.tile_seq, tiles.tile_start
    else:
        grid = (num_heads // pack, batch, triton.cdiv(max_query_len, tokens))
        tile_seq = tile_start = query_start_loc  # not read
    if batch == 0 or grid[-1] <= 0 or q.shape[0] == 0:
        return out
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        tile_seq, tile_start,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        *out.stride(), scale * LOG2E,
        GROUP=group, PACK=pack, PAGE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim, 16), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        TILED=tiles is not None, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def attention_tiles(
    query_start_loc: torch.Tensor, num_tokens: int, query_block: int
) -> AttentionTileTable:
    """The tile table of a ragged step, on the device (no host read): one entry per
    block of ``query_block`` queries of one request, every request's (padding ones',
    with context 0, too: they store zeros), then -1 entries up to the bound that the
    step's ``num_tokens`` rows and requests set.

    Args:
        query_start_loc: ``[batch + 1]`` offsets of each request's queries.
        num_tokens: rows of the step's query tensor (padding included).
        query_block: query tokens per tile: `query_block` of the launch's tiles.
    """
    batch = query_start_loc.shape[0] - 1
    every = torch.zeros(batch, dtype=torch.long, device=query_start_loc.device)
    bound = max_chunks(num_tokens, batch, query_block)
    layout = chunk_layout(query_start_loc, every, query_block, num_tokens, num_chunks=bound)
    return AttentionTileTable(layout.chunk_seq, layout.chunk_start, query_block)
