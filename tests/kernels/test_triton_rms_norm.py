"""The fused Triton RMS norms compute what the engine's torch norm modules compute."""

from __future__ import annotations

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.engine.models.layers import RMSNorm, RMSNormGated  # noqa: E402
from avmp.kernels.triton.rms_norm import add_rms_norm, rms_norm  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_plain_norm_matches_module(dtype: torch.dtype, fp32_weight: bool) -> None:
    norm = RMSNorm(96, 1e-5, fp32_weight).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96))
    x = torch.randn(5, 96, device=DEVICE, dtype=dtype) * 3
    expected = norm(x)
    out = rms_norm(x, norm.weight, norm.variance_epsilon, fp32_weight=fp32_weight)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_grouped_norm_matches_module(dtype: torch.dtype) -> None:
    norm = RMSNormGated(64, 16, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64))
    wide = torch.randn(3, 100, device=DEVICE, dtype=dtype)
    x, gate = wide[:, :64], wide[:, 36:]  # strided rows, as the mixer's split hands them
    expected = norm(x, gate)
    out = rms_norm(x, norm.weight, norm.variance_epsilon, gate, norm.group_size)
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_add_norm_matches_the_sum_then_the_module(dtype: torch.dtype, scale: float | None) -> None:
    norm = RMSNorm(96, 1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96))
    x = torch.randn(5, 96, device=DEVICE, dtype=dtype) * 3
    delta = torch.randn(5, 160, device=DEVICE, dtype=dtype)[:, 64:]  # strided rows
    expected_sum = x + (delta if scale is None else delta * scale)
    total, out = add_rms_norm(x, delta, norm.weight, norm.variance_epsilon, scale)
    if dtype == torch.bfloat16:  # rounded as torch rounds, bit for bit
        assert torch.equal(total, expected_sum)
    else:  # fp32 may fuse the product into the sum (one rounding instead of two)
        torch.testing.assert_close(total, expected_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, norm(expected_sum), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])
    with pytest.raises(ValueError, match="shape"):
        add_rms_norm(x, delta[:, :8], norm.weight, 1e-5)


def test_rejects_a_size_that_is_no_multiple_of_the_group() -> None:
    x = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        rms_norm(x, torch.ones(10, device=DEVICE), 1e-6, group_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("scale", "with_bias"), [(None, False), (0.37, True)])
def test_add_norm_sums_split_parts_as_their_total_does(
    dtype: torch.dtype, scale: float | None, with_bias: bool
) -> None:
    """A split-K GEMM's unsummed parts as the delta: the very bits of the parts summed
    by the reduce kernel first (`SplitParts.total`), then the norm, one launch fewer."""
    from avmp.kernels.triton.skinny_linear import SkinnyConfig, skinny_linear, skinny_parts

    gen = torch.Generator().manual_seed(5)
    h, w, b, x = (torch.randn(shape, generator=gen).to(DEVICE, dtype)
                  for shape in ((6, 256), (96, 256), (96,), (6, 96)))  # fmt: skip
    bias = b if with_bias else None
    config = SkinnyConfig(16, 32, 32, 4)  # 8 K steps in 4 parts
    parts = skinny_parts(h, w, bias, config)
    assert parts.parts.shape == (4, 6, 96) and parts.shape == (6, 96) and parts.dtype == dtype
    total = parts.total()
    assert torch.equal(total, skinny_linear(h, w, bias, config))
    weight = (1 + 0.3 * torch.randn(96, generator=gen)).to(DEVICE, dtype)
    s_parts, out_parts = add_rms_norm(x, parts, weight, 1e-5, scale)
    s_total, out_total = add_rms_norm(x, total, weight, 1e-5, scale)
    assert torch.equal(s_parts, s_total) and torch.equal(out_parts, out_total)
    with pytest.raises(ValueError, match="dtype"):
        add_rms_norm(x.to(torch.float16), parts, weight.to(torch.float16), 1e-5)
    with pytest.raises(ValueError, match="splitting K"):
        skinny_parts(h, w, bias, SkinnyConfig(16, 32, 32, 1))
