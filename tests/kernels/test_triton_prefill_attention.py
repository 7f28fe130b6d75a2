"""Triton ragged causal prefill attention over strided page-major KV against
`avmp.kernels.reference.paged_attention` in float64: chunked prefill (earlier chunks
already cached), GQA groups 1 to 8 with the query heads packed per program, head dims 24
to 128, odd block sizes, both launch modes (the host grid and the device tile table of
CUDA graphs), and tiles whose key loops have several unmasked tiles before the diagonal.
Kept small: under the interpreter every program runs in Python."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import reference  # noqa: E402
from avmp.kernels.triton.prefill_attention import (  # noqa: E402
    AttentionTiles,
    attention_tiles,
    launch_tiles,
    pack_heads,
    prefill_attention,
    query_block,
)

# Rows of 8 tokens x 2 heads and 16-key tiles: a 40-token context walks two unmasked key
# tiles before its diagonal one. The largest: 128 rows, 64-key tiles, 8 warps, 2 stages.
SMALL = AttentionTiles(block_m=16, block_n=16)
LARGE = AttentionTiles(block_m=128, block_n=64, num_warps=8, num_stages=2)


def reference_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`reference.paged_attention` per request, in float64 on the CPU."""
    block_size = k_cache.shape[1]
    k64, v64 = k_cache.cpu().double(), v_cache.cpu().double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    qsl = query_start_loc.cpu().tolist()
    for b, ctx in enumerate(context_lens.cpu().tolist()):
        q_len = qsl[b + 1] - qsl[b]
        pages = block_tables[b, : -(-ctx // block_size)].long().cpu()
        queries = q[qsl[b] : qsl[b + 1]].cpu().double()
        out[qsl[b] : qsl[b + 1]] = reference.paged_attention(
            queries, k64, v64, pages, ctx - q_len, scale)
    return out


def make_case(
    seed: int, dtype: torch.dtype, q_lens: list[int], cached: list[int], num_heads: int,
    num_kv_heads: int, head_dim: int, block_size: int,
) -> tuple[torch.Tensor, ...]:
    """Packed queries; each request's pool pages hold ``cached + q_len`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ctx = [c + n for c, n in zip(cached, q_lens, strict=True)]
    max_pages = max(-(-c // block_size) for c in ctx)
    num_pages = len(ctx) * max_pages + 2
    k_cache, _, v_cache = strided_views(
        (num_pages, block_size, num_kv_heads, head_dim), 3, dtype, DEVICE, gen, True
    )
    perm = torch.randperm(num_pages, generator=gen)
    block_tables = torch.full((len(ctx), max_pages), num_pages + 1000, dtype=torch.int32)
    for b, c in enumerate(ctx):
        used = -(-c // block_size)
        block_tables[b, :used] = perm[b * max_pages : b * max_pages + used].int()
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(num_heads, sum(q_lens), head_dim, generator=gen).to(dtype).to(DEVICE)
    q = q.transpose(0, 1)  # non-contiguous [T, Hq, D]
    return (q, k_cache, v_cache, block_tables.to(DEVICE), qsl.to(DEVICE),
            torch.tensor(ctx, dtype=torch.int32, device=DEVICE))


def run_and_check(case: tuple[torch.Tensor, ...], max_query_len: int, tiled: bool,
                  config: AttentionTiles | None) -> None:
    """Both launch modes write every query row (the output starts poisoned) and match
    the reference."""
    q, k_cache, v_cache, bt, qsl, ctx = case
    scale = q.shape[2] ** -0.5
    out = torch.full(tuple(q.shape), POISON, dtype=q.dtype, device=DEVICE)
    tiles = None
    if tiled:
        used = launch_tiles(q, k_cache) if config is None else config
        block = query_block(used, q.shape[1] // k_cache.shape[2])
        tiles = attention_tiles(qsl, q.shape[0], block)
    prefill_attention(q, k_cache, v_cache, bt, qsl, ctx, scale, max_query_len, out=out,
                      tiles=tiles, config=config)  # fmt: skip
    ref = reference_prefill(q, k_cache, v_cache, bt, qsl, ctx, scale)
    assert_close("prefill", out, ref, q.dtype)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize(
    "dtype,q_lens,cached,num_heads,num_kv_heads,head_dim,block_size",
    [
        (torch.float32, [5, 70, 1], [0, 0, 9], 4, 2, 32, 16),
        (torch.float32, [33, 12], [40, 3], 3, 1, 24, 5),
        (torch.bfloat16, [66, 7, 20], [0, 60, 17], 4, 4, 64, 16),
        (torch.float16, [9, 1, 40], [100, 0, 8], 6, 2, 32, 8),
        (torch.bfloat16, [21, 3], [70, 0], 8, 1, 128, 16),
        (torch.float32, [20, 37], [0, 75], 8, 2, 64, 16),
    ],
)
def test_prefill_matches_reference(
    dtype: torch.dtype, q_lens: list[int], cached: list[int], num_heads: int,
    num_kv_heads: int, head_dim: int, block_size: int, tiled: bool,
) -> None:
    case = make_case(11, dtype, q_lens, cached, num_heads, num_kv_heads, head_dim, block_size)
    run_and_check(case, max(q_lens), tiled, None)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("config", [SMALL, LARGE], ids=["16x16", "128x64"])
@pytest.mark.parametrize(
    "dtype,q_lens,cached,num_heads,num_kv_heads,head_dim",
    [
        (torch.bfloat16, [40, 9], [0, 50], 4, 1, 64),  # GQA 4
        (torch.float32, [7, 30], [41, 0], 2, 2, 32),  # no GQA: one head per program
    ],
)
def test_other_tiles_match_reference(
    dtype: torch.dtype, q_lens: list[int], cached: list[int], num_heads: int,
    num_kv_heads: int, head_dim: int, config: AttentionTiles, tiled: bool,
) -> None:
    """The tiles the tuner may pick: a full key tile before the diagonal, a diagonal
    that spans two key tiles, tiles wider than a request."""
    case = make_case(3, dtype, q_lens, cached, num_heads, num_kv_heads, head_dim, 16)
    run_and_check(case, max(q_lens), tiled, config)


def test_heads_pack_by_the_largest_divisor_that_keeps_16_tokens() -> None:
    default = AttentionTiles()
    assert (pack_heads(default, 1), query_block(default, 1)) == (1, 64)
    assert (pack_heads(default, 4), query_block(default, 4)) == (4, 16)
    assert (pack_heads(default, 8), query_block(default, 8)) == (4, 16)
    assert (pack_heads(default, 3), query_block(default, 3)) == (3, 21)
    assert (pack_heads(LARGE, 5), query_block(LARGE, 5)) == (5, 25)
    assert (pack_heads(SMALL, 8), query_block(SMALL, 8)) == (1, 16)


def test_a_tile_table_of_another_query_block_is_refused() -> None:
    q, k_cache, v_cache, bt, qsl, ctx = make_case(2, torch.float32, [4], [0], 4, 1, 16, 4)
    tiles = attention_tiles(qsl, q.shape[0], 64)  # the default config's block is 16 here
    with pytest.raises(ValueError, match="64-token tiles; this launch .* takes 16"):
        prefill_attention(q, k_cache, v_cache, bt, qsl, ctx, 0.25, 4, tiles=tiles,
                          config=AttentionTiles())  # fmt: skip


def test_rows_outside_the_queries_stay_untouched() -> None:
    q, k_cache, v_cache, bt, qsl, ctx = make_case(5, torch.float32, [3, 4], [2, 0], 2, 1, 16, 4)
    out = torch.full((q.shape[0] + 2, 2, 16), POISON, device=DEVICE)
    prefill_attention(q, k_cache, v_cache, bt, qsl, ctx, 0.25, 4, out=out[:-2])
    assert torch.isnan(out[-2:]).all()
    ref = reference_prefill(q, k_cache, v_cache, bt, qsl, ctx, 0.25)
    assert_close("prefill", out[:-2], ref, torch.float32)


def test_the_tile_table_covers_every_query_block_once() -> None:
    """One tile per block of queries of each request, padding requests (context 0)
    included; the table's length follows from the token and request counts alone."""
    block = 16
    qsl = torch.tensor([0, 1, 1 + 2 * block + 3, 2 * block + 5, 2 * block + 5])
    tiles = attention_tiles(qsl.to(DEVICE), 4 * block, block)
    assert tiles.query_block == block
    assert tiles.tile_seq.shape[0] == 4 + 4  # cdiv(tokens, block) + requests
    assert tiles.tile_seq.tolist() == [0, 1, 1, 1, 2, -1, -1, -1]
    starts = tiles.tile_start.tolist()[:5]
    assert starts == [0, 1, 1 + block, 1 + 2 * block, 2 * block + 4]


def test_padding_requests_store_zeros_through_the_tiles() -> None:
    """A CUDA-graph step pads with requests of context 0 and one token each: the tiled
    launch gives their rows zeros (finite, whatever the output held) and leaves the
    real rows as the unpadded launch computes them."""
    q, k_cache, v_cache, bt, qsl, ctx = make_case(7, torch.float32, [5, 9], [3, 0], 2, 1, 16, 4)
    padded_q = torch.cat([q, torch.randn(2, 2, 16, device=DEVICE)])
    padded_bt = torch.cat([bt, torch.zeros_like(bt[:2])])
    padded_qsl = torch.cat([qsl, qsl[-1:] + torch.tensor([1, 2], device=DEVICE, dtype=qsl.dtype)])
    padded_ctx = torch.cat([ctx, torch.zeros_like(ctx[:2])])
    out = torch.full(tuple(padded_q.shape), POISON, device=DEVICE)
    config = launch_tiles(q, k_cache)
    tiles = attention_tiles(padded_qsl, padded_q.shape[0], query_block(config, 2))
    prefill_attention(padded_q, k_cache, v_cache, padded_bt, padded_qsl, padded_ctx, 0.25,
                      0, out=out, tiles=tiles, config=config)  # fmt: skip
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    ref = reference_prefill(q, k_cache, v_cache, bt, qsl, ctx, 0.25)
    assert_close("prefill", out[:-2], ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA: sizes too large to interpret")
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("config", [None, LARGE, AttentionTiles(block_m=128, block_n=128,
                                                                num_warps=8, num_stages=2)],
                         ids=["this-gpu", "128x64", "128x128"])  # fmt: skip
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_contexts_on_the_gpu(head_dim: int, config: AttentionTiles | None,
                                  tiled: bool) -> None:
    """The shapes the tuned table is for (32 query heads, 8 KV heads, bf16) with this
    GPU's tiles (the tuned table's, or the defaults) and large tuner candidates: a chunk
    after a long cached context beside a fresh prompt."""
    case = make_case(13, torch.bfloat16, [1000, 333], [3000, 0], 32, 8, head_dim, 16)
    run_and_check(case, 1000, tiled, config)
