"""Triton gated delta rule against the torch reference: decode over strided slot views
(padding rows untouched), and the varlen prefill over a ragged batch with initial
states read from slots or zeroed, final states written back in their dtype."""

from __future__ import annotations

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import deltanet as ref  # noqa: E402
from avmp.kernels.triton.gated_delta import gated_delta_decode, gated_delta_varlen  # noqa: E402

KEY_HEADS, VALUE_HEADS, DK, DV = 2, 4, 16, 40  # DV spans two column blocks, one partial


def rule_inputs(tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    q, k = randn(tokens, KEY_HEADS, DK), randn(tokens, KEY_HEADS, DK)
    v = randn(tokens, VALUE_HEADS, DV)
    g = -torch.rand(tokens, VALUE_HEADS, generator=generator) * 0.3
    beta = torch.rand(tokens, VALUE_HEADS, generator=generator)
    return q, k, v, g, beta


def strided_states(num_slots: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A ``[slots, Hv, dk, dv]`` view with a gap between slots (as a pool view has)."""
    generator = torch.Generator().manual_seed(seed)
    backing = torch.randn(num_slots, VALUE_HEADS * DK * DV + 7, generator=generator)
    view = backing[:, : VALUE_HEADS * DK * DV].view(num_slots, VALUE_HEADS, DK, DV)
    return view.to(dtype) if dtype != torch.float32 else view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_the_reference_step(dtype: torch.dtype) -> None:
    states = strided_states(6, dtype, seed=1)
    expected_states = states.clone()
    slots = torch.tensor([4, -1, 0, 2])
    q, k, v, g, beta = rule_inputs(4, seed=2)
    live = torch.tensor([0, 2, 3])
    gathered = expected_states[slots[live]]
    expected = ref.gated_delta_step(gathered, q[live], k[live], v[live], g[live], beta[live])
    expected_states[slots[live]] = gathered
    on = [t.to(DEVICE) for t in (q, k, v, g, beta)]
    device_states = states.to(DEVICE)
    out = gated_delta_decode(device_states, slots.to(DEVICE), *on)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.cpu()[live], expected, **tol)
    torch.testing.assert_close(device_states.cpu().float(), expected_states.float(), **tol)
    assert torch.equal(device_states.cpu()[[1, 3, 5]], states[[1, 3, 5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_prefill_matches_the_chunked_reference(dtype: torch.dtype) -> None:
    lens, slots, fresh = [9, 1, 0, 14, 3], [5, 1, 3, -1, 0], [False, False, True, True, True]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q, k, v, g, beta = rule_inputs(starts[-1], seed=3)
    states = strided_states(7, dtype, seed=4)
    expected_states = states.clone()
    expected = ref.gated_delta_varlen(
        expected_states, slots, starts, q, k, v, g, beta, [not f for f in fresh], chunk_size=4
    )
    device_states = states.to(DEVICE)
    out = gated_delta_varlen(
        device_states,
        torch.tensor(slots, device=DEVICE),
        torch.tensor(starts, device=DEVICE),
        *[t.to(DEVICE) for t in (q, k, v, g, beta)],
        has_initial_state=torch.tensor([not f for f in fresh], device=DEVICE),
    )
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    live = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in (0, 1, 4)])
    torch.testing.assert_close(out.cpu()[live], expected[live], **tol)
    torch.testing.assert_close(device_states.cpu().float(), expected_states.float(), **tol)
    assert torch.equal(device_states.cpu()[[2, 4, 6]], states[[2, 4, 6]])


def test_inputs_are_checked() -> None:
    states = strided_states(2, torch.float32, seed=5).to(DEVICE)
    q, k, v, g, beta = (t.to(DEVICE) for t in rule_inputs(2, seed=6))
    with pytest.raises(ValueError, match="beta"):
        gated_delta_decode(states, torch.tensor([0, 1], device=DEVICE), q, k, v, g, beta[:, :2])
    with pytest.raises(ValueError, match="query_start_loc"):
        gated_delta_varlen(states, torch.tensor([0], device=DEVICE),
                           torch.tensor([0, 1, 2], device=DEVICE), q, k, v, g, beta)  # fmt: skip
