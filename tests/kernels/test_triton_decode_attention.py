"""Triton decode attention against a float64 torch reference, over strided page-major
views with shuffled block tables, GQA, ragged contexts and split-K."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.decode_attention import decode_attention  # noqa: E402


def reference_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Plain float64 softmax attention, one request at a time."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        ctx = int(context_lens[b])
        if ctx == 0:
            continue
        pages = block_tables[b, : -(-ctx // block_size)].long().cpu()
        k = k_cache.cpu()[pages].reshape(-1, num_kv_heads, head_dim)[:ctx].double()
        v = v_cache.cpu()[pages].reshape(-1, num_kv_heads, head_dim)[:ctx].double()
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [T, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].cpu().double(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v)
    return out


def make_case(
    seed: int, dtype: torch.dtype, batch: int, num_heads: int, num_kv_heads: int,
    head_dim: int, block_size: int, max_context: int, permute_inner: bool,
) -> tuple[torch.Tensor, ...]:
    """Random queries, a strided two-layer KV pool, shuffled pages and ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    max_pages = -(-max_context // block_size)
    num_pages = batch * max_pages + 3
    k_cache, v_cache, *_ = strided_views(
        (num_pages, block_size, num_kv_heads, head_dim), 4, dtype, DEVICE, gen, permute_inner
    )
    context_lens = torch.randint(1, max_context + 1, (batch,), generator=gen)
    context_lens[0] = max_context
    perm = torch.randperm(num_pages, generator=gen)
    # Unused table entries point past the pool: reading one would fault.
    block_tables = torch.full((batch, max_pages), num_pages + 1000, dtype=torch.int32)
    for b in range(batch):
        used = -(-int(context_lens[b]) // block_size)
        block_tables[b, :used] = perm[b * max_pages : b * max_pages + used].int()
    q = torch.randn(batch, head_dim, num_heads, generator=gen).to(dtype).to(DEVICE)
    q = q.transpose(1, 2)  # non-contiguous [B, Hq, D]
    return q, k_cache, v_cache, block_tables.to(DEVICE), context_lens.int().to(DEVICE)


@pytest.mark.parametrize(
    "dtype,batch,num_heads,num_kv_heads,head_dim,block_size,max_context,num_splits",
    [
        (torch.float32, 3, 4, 2, 32, 16, 70, 1),
        (torch.float32, 2, 6, 2, 24, 5, 41, 3),
        (torch.bfloat16, 3, 8, 2, 64, 16, 100, 1),
        (torch.float16, 2, 4, 4, 32, 8, 90, 4),
        (torch.bfloat16, 2, 2, 1, 16, 32, 64, None),
    ],
)
def test_decode_matches_reference(
    dtype: torch.dtype, batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, max_context: int, num_splits: int | None,
) -> None:
    q, k_cache, v_cache, bt, ctx = make_case(
        7, dtype, batch, num_heads, num_kv_heads, head_dim, block_size, max_context,
        permute_inner=num_kv_heads > 1,
    )
    scale = head_dim**-0.5
    out = torch.full((batch, num_heads, head_dim), POISON, dtype=dtype, device=DEVICE)
    decode_attention(q, k_cache, v_cache, bt, ctx, scale, out=out, num_splits=num_splits)
    ref = reference_decode(q, k_cache, v_cache, bt, ctx, scale)
    assert_close("decode", out, ref, dtype)


def test_empty_context_gives_zeros_and_long_split_merges() -> None:
    q, k_cache, v_cache, bt, ctx = make_case(
        3, torch.float32, 3, 4, 2, 32, 4, 48, permute_inner=True
    )
    ctx[1] = 0
    out = decode_attention(q, k_cache, v_cache, bt, ctx, 0.3, num_splits=5)
    ref = reference_decode(q, k_cache, v_cache, bt, ctx, 0.3)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    assert_close("decode", out, ref, torch.float32)


def test_rejects_mismatched_heads() -> None:
    q, k_cache, v_cache, bt, ctx = make_case(1, torch.float32, 1, 3, 2, 16, 4, 8, False)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k_cache, v_cache, bt, ctx, 1.0)


@pytest.mark.parametrize(("block_n", "num_warps", "num_stages"), [(16, 2, 2), (128, 8, 3)])
def test_tiles_given_compute_the_same_attention(
    block_n: int, num_warps: int, num_stages: int
) -> None:
    """The tiles `benchmarks/decode_attention_tiles.py` sweeps: another loop step, warps
    and stages, split and not, against the reference."""
    q, k_cache, v_cache, bt, ctx = make_case(
        11, torch.bfloat16, 3, 8, 2, 64, 16, 150, permute_inner=True
    )
    ref = reference_decode(q, k_cache, v_cache, bt, ctx, 0.125)
    for splits in (1, 3):
        out = decode_attention(q, k_cache, v_cache, bt, ctx, 0.125, num_splits=splits,
                               block_n=block_n, num_warps=num_warps,
                               num_stages=num_stages)  # fmt: skip
        assert_close("decode", out, ref, torch.bfloat16)


@pytest.mark.parametrize("bad", [8, 48])
def test_rejects_a_bad_block_n(bad: int) -> None:
    q, k_cache, v_cache, bt, ctx = make_case(1, torch.float32, 1, 2, 1, 16, 4, 8, False)
    with pytest.raises(ValueError, match="block_n"):
        decode_attention(q, k_cache, v_cache, bt, ctx, 1.0, block_n=bad)
