"""Norm and activation kernels that ask L2 for the next linear's weights compute exactly
what they compute without (the prefetch is a hint), and the prefetch is asked only where
bulk prefetches exist, in whole 16-byte units, up to the limit."""

from __future__ import annotations

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton import activations, l2_prefetch, rms_norm  # noqa: E402

HOPPER = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] >= 9


def test_prefetch_args() -> None:
    weight = torch.zeros(100, 7, dtype=torch.bfloat16, device=DEVICE)  # 1,400 bytes
    assert l2_prefetch.prefetch_args(None) == (None, 0)
    assert l2_prefetch.prefetch_args(weight, 0) == (None, 0)
    if not HOPPER:
        assert l2_prefetch.prefetch_args(weight) == (None, 0)
        return
    assert l2_prefetch.prefetch_args(weight) == (weight, 1392)  # whole 16-byte units
    assert l2_prefetch.prefetch_args(weight, 100) == (weight, 96)
    assert l2_prefetch.prefetch_args(weight[:, 1:], 100) == (None, 0)  # not 16-byte aligned
    assert l2_prefetch.num_threads(8) == 128 and l2_prefetch.num_threads(1) == 32


@pytest.mark.skipif(not HOPPER, reason="bulk L2 prefetches need compute capability 9.0")
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_kernels_with_a_prefetch_compute_what_they_compute_without(rows: int) -> None:
    torch.manual_seed(7)
    x, d, g = (torch.randn(rows, 2048, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    nw = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    for nbytes in (16, 5 << 20, 64 << 20):  # a sliver, a share, more than the weight
        weight = torch.randn(4096, 1024, device=DEVICE, dtype=torch.bfloat16)
        pf = l2_prefetch.prefetch_args(weight, nbytes)
        assert pf[1] == min(nbytes, weight.numel() * 2)
        s, h = rms_norm.add_rms_norm(x, d, nw, 1e-5, 0.5, prefetch=pf)
        s0, h0 = rms_norm.add_rms_norm(x, d, nw, 1e-5, 0.5)
        assert torch.equal(s, s0) and torch.equal(h, h0)
        gated = rms_norm.rms_norm(x, nw, 1e-5, g, 512, prefetch=pf)
        assert torch.equal(gated, rms_norm.rms_norm(x, nw, 1e-5, g, 512))
        assert torch.equal(activations.silu_mul(x, g, prefetch=pf), activations.silu_mul(x, g))
    torch.cuda.synchronize()
