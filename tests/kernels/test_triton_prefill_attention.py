"""Triton ragged causal prefill attention over strided page-major KV against a float64
torch reference: chunked prefill (earlier chunks already cached), GQA, odd block sizes."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.prefill_attention import (  # noqa: E402
    BLOCK_M,
    attention_tiles,
    prefill_attention,
)


def reference_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Plain float64 causal softmax attention, one request at a time."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    qsl = query_start_loc.cpu().tolist()
    for b, ctx in enumerate(context_lens.cpu().tolist()):
        q_len = qsl[b + 1] - qsl[b]
        pages = block_tables[b, : -(-ctx // block_size)].long().cpu()
        group = num_heads // num_kv_heads
        k = k_cache.cpu()[pages].reshape(-1, num_kv_heads, head_dim)[:ctx].double()
        v = v_cache.cpu()[pages].reshape(-1, num_kv_heads, head_dim)[:ctx].double()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        queries = q[qsl[b] : qsl[b + 1]].cpu().double()  # [Tq, H, D]
        scores = torch.einsum("qhd,thd->hqt", queries, k) * scale
        query_pos = torch.arange(ctx - q_len, ctx)
        visible = torch.arange(ctx)[None, :] <= query_pos[:, None]  # [Tq, T]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[qsl[b] : qsl[b + 1]] = torch.einsum("hqt,thd->qhd", scores.softmax(-1), v)
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


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize(
    "dtype,q_lens,cached,num_heads,num_kv_heads,head_dim,block_size",
    [
        (torch.float32, [5, 70, 1], [0, 0, 9], 4, 2, 32, 16),
        (torch.float32, [33, 12], [40, 3], 3, 1, 24, 5),
        (torch.bfloat16, [66, 7, 20], [0, 60, 17], 4, 4, 64, 16),
        (torch.float16, [9, 1, 40], [100, 0, 8], 6, 2, 32, 8),
    ],
)
def test_prefill_matches_reference(
    dtype: torch.dtype, q_lens: list[int], cached: list[int], num_heads: int,
    num_kv_heads: int, head_dim: int, block_size: int, tiled: bool,
) -> None:
    q, k_cache, v_cache, bt, qsl, ctx = make_case(
        11, dtype, q_lens, cached, num_heads, num_kv_heads, head_dim, block_size
    )
    scale = head_dim**-0.5
    out = torch.full(tuple(q.shape), POISON, dtype=dtype, device=DEVICE)
    tiles = attention_tiles(qsl, q.shape[0]) if tiled else None
    prefill_attention(q, k_cache, v_cache, bt, qsl, ctx, scale, max(q_lens), out=out,
                      tiles=tiles)  # fmt: skip
    ref = reference_prefill(q, k_cache, v_cache, bt, qsl, ctx, scale)
    assert_close("prefill", out, ref, dtype)


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
    qsl = torch.tensor([0, 1, 1 + 2 * BLOCK_M + 3, 2 * BLOCK_M + 5, 2 * BLOCK_M + 5])
    tiles = attention_tiles(qsl.to(DEVICE), 4 * BLOCK_M)
    assert tiles.chunk_seq.shape[0] == 4 + 4  # cdiv(tokens, BLOCK_M) + requests
    assert tiles.chunk_seq.tolist() == [0, 1, 1, 1, 2, -1, -1, -1]
    starts = tiles.chunk_start.tolist()[:5]
    assert starts == [0, 1, 1 + BLOCK_M, 1 + 2 * BLOCK_M, 2 * BLOCK_M + 4]


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
    tiles = attention_tiles(padded_qsl, padded_q.shape[0])
    prefill_attention(padded_q, k_cache, v_cache, padded_bt, padded_qsl, padded_ctx, 0.25,
                      0, out=out, tiles=tiles)  # fmt: skip
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    ref = reference_prefill(q, k_cache, v_cache, bt, qsl, ctx, 0.25)
    assert_close("prefill", out[:-2], ref, torch.float32)
