"""Triton causal conv1d decode update against a float64 torch reference, on strided
slot-major conv-state views with shuffled slots, both column conventions (d_conv - 1
and d_conv), bias and SiLU options, and padding rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.conv1d_update import (  # noqa: E402
    BLOCK_C,
    MAX_BLOCK_C,
    block_channels,
    conv1d_update,
)


def reference_conv_step(
    conv_state: torch.Tensor, slot_idx: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 conv step: (output [b, C], new states of the slots [b, C, columns])."""
    hist = conv_state.cpu().double()[slot_idx.long().cpu()]  # [b, C, W]
    ext = torch.cat([hist, x.cpu().double()[:, :, None]], dim=2)  # [b, C, W + 1]
    width = weight.shape[1]
    out = (ext[:, :, -width:] * weight.cpu().double()).sum(-1)
    if bias is not None:
        out = out + bias.cpu().double()
    if silu:
        out = F.silu(out)
    return out, ext[:, :, 1:]


def make_case(
    seed: int, dtype: torch.dtype, batch: int, channels: int, width: int, columns: int,
    num_slots: int,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state, _ = strided_views((num_slots, channels, columns), 2, dtype, DEVICE, gen, True)
    return {
        "conv_state": state,
        "slot_idx": torch.randperm(num_slots, generator=gen)[:batch].int().to(DEVICE),
        "x": torch.randn(channels, batch, generator=gen).to(dtype).to(DEVICE).t(),
        "weight": torch.randn(channels, width, generator=gen).to(dtype).to(DEVICE),
        "bias": torch.randn(channels, generator=gen).to(dtype).to(DEVICE),
    }


@pytest.mark.parametrize(
    "dtype,batch,channels,width,columns,use_bias,silu",
    [
        (torch.float32, 3, 40, 4, 3, True, True),
        (torch.float32, 2, 70, 4, 4, True, True),
        (torch.bfloat16, 4, 96, 4, 3, True, True),
        (torch.float16, 2, 33, 3, 5, False, False),
        (torch.float32, 1, 8, 2, 1, False, True),
    ],
)
def test_conv_update_matches_reference(
    dtype: torch.dtype, batch: int, channels: int, width: int, columns: int, use_bias: bool,
    silu: bool,
) -> None:
    case = make_case(3, dtype, batch, channels, width, columns, 7)
    bias = case["bias"] if use_bias else None
    before = case["conv_state"].clone()
    out_ref, state_ref = reference_conv_step(
        case["conv_state"], case["slot_idx"], case["x"], case["weight"], bias, silu
    )
    out = torch.full((batch, channels), POISON, dtype=dtype, device=DEVICE)
    conv1d_update(case["conv_state"], case["slot_idx"], case["x"], case["weight"], bias,
                  activation="silu" if silu else None, out=out)
    assert_close("out", out, out_ref, dtype)
    slots = case["slot_idx"].long()
    # The new state is a pure shift: exact, whatever the dtype.
    assert torch.equal(case["conv_state"][slots].cpu().double(), state_ref)
    kept = [s for s in range(7) if s not in slots.tolist()]
    assert torch.equal(case["conv_state"][kept], before[kept])


def test_negative_slot_rows_are_skipped() -> None:
    case = make_case(8, torch.float32, 3, 16, 4, 3, 5)
    case["slot_idx"][0] = -1
    rows = torch.tensor([1, 2], device=DEVICE)
    out_ref, _ = reference_conv_step(case["conv_state"], case["slot_idx"][rows],
                                     case["x"][rows], case["weight"], case["bias"], True)
    before = case["conv_state"].clone()
    out = torch.full((3, 16), POISON, device=DEVICE)
    conv1d_update(case["conv_state"], case["slot_idx"], case["x"], case["weight"],
                  case["bias"], out=out)
    assert torch.isnan(out[0]).all()
    assert_close("out", out[1:], out_ref, torch.float32)
    kept = [s for s in range(5) if s not in case["slot_idx"][1:].tolist()]
    assert torch.equal(case["conv_state"][kept], before[kept])


def test_rejects_too_few_columns() -> None:
    case = make_case(1, torch.float32, 1, 8, 4, 2, 2)
    with pytest.raises(ValueError, match="columns"):
        conv1d_update(case["conv_state"], case["slot_idx"], case["x"], case["weight"])


@pytest.mark.parametrize("block_c", [16, 128, 512])
def test_channels_per_program_change_no_bit(block_c: int) -> None:
    """Each channel's sum is its own: any ``block_c`` gives the default launch's bits,
    outputs and states (channels off the block multiples, a padding row)."""
    case = make_case(5, torch.bfloat16, 4, 300, 4, 3, 9)
    case["slot_idx"][2] = -1
    states = {}
    outs = {}
    for chosen in (None, block_c):
        state = case["conv_state"].clone()
        outs[chosen] = conv1d_update(state, case["slot_idx"], case["x"], case["weight"],
                                     case["bias"], block_c=chosen)  # fmt: skip
        states[chosen] = state
    assert torch.equal(outs[None][[0, 1, 3]], outs[block_c][[0, 1, 3]])
    assert torch.equal(states[None], states[block_c])


def test_block_channels_aims_at_one_wave() -> None:
    # batch-64 Granite-4.0-H-Micro on an H100: 4,352 channels, 132 SMs
    assert block_channels(64, 4352, 132) == 256
    assert block_channels(1, 4352, 132) == BLOCK_C  # never below the default
    assert block_channels(256, 16384, 132) == MAX_BLOCK_C  # nor above the cap
    assert block_channels(64, 100, 1) == 128  # no wider than the channels need
    for batch, channels, sms in [(3, 40, 1), (64, 4352, 132), (8, 18560, 132)]:
        width = block_channels(batch, channels, sms)
        assert width & (width - 1) == 0 and BLOCK_C <= width <= MAX_BLOCK_C


@pytest.mark.parametrize("bad", [8, 48, 1024])
def test_rejects_a_bad_block_c(bad: int) -> None:
    case = make_case(1, torch.float32, 1, 8, 4, 3, 2)
    with pytest.raises(ValueError, match="block_c"):
        conv1d_update(case["conv_state"], case["slot_idx"], case["x"], case["weight"],
                      block_c=bad)  # fmt: skip
