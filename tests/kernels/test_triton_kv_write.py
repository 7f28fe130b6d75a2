"""The Triton KV write against the reference's indexed store: strided page-major views,
GQA head counts that are not powers of two, and padding rows (slot -1) that write nothing."""

from __future__ import annotations

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.reference import write_kv  # noqa: E402
from avmp.kernels.triton.kv_write import kv_write  # noqa: E402


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_the_reference_and_skips_padding(heads: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(heads)
    pages, block, head_dim, tokens = 6, 4, 24, 9
    # a slot-major pool: every page's K and V are strided views, as the engine's pools are
    pool = torch.randn(pages, 2, block, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    # in the cache's dtype, as the engine's projections give them (a conversion is the
    # kernel's cast, not the reference's)
    key = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(pages * block, generator=gen)[:tokens]
    slots[[2, 5]] = -1  # padding rows
    expected = pool.clone()
    real = slots >= 0
    write_kv(expected[:, 0], expected[:, 1], key[real.to(DEVICE)], value[real.to(DEVICE)],
             (slots[real] // block).to(DEVICE), (slots[real] % block).to(DEVICE))
    kv_write(k_cache, v_cache, key, value, slots.to(torch.int32).to(DEVICE))
    assert torch.equal(pool, expected)
