"""The fused MLP activations compute what the torch modules compute, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.activations import relu_squared, silu_mul  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    both = torch.randn(5, 2 * 1500, device=DEVICE, dtype=dtype) * 3
    gate, up = both.chunk(2, dim=-1)  # strided halves, as Granite's shared MLP has them
    expected = F.silu(gate) * up
    out = silu_mul(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    # silu's exp may differ by an ulp of fp32 between libraries: rarely one bf16 step
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_matches_torch_exactly(dtype: torch.dtype) -> None:
    x = torch.randn(3, 2100, device=DEVICE, dtype=dtype) * 4
    assert torch.equal(relu_squared(x), torch.square(F.relu(x)))


def test_gate_and_up_must_match() -> None:
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="up must match"):
        silu_mul(x, x[:, :4])
