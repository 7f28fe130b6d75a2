"""Triton Mamba2 decode step against a float64 torch reference, on strided slot-major
state views with shuffled slots, head groups, optional D / dt_bias / z, fp32 and bf16
state, and padding rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.mamba2_state_update import mamba2_state_update  # noqa: E402


def reference_step(
    state: torch.Tensor, slot_idx: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    dt_bias: torch.Tensor | None, z: torch.Tensor | None, dt_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 Mamba2 step (transformers' selective-state-update fallback); returns
    (y, new states of the slots) without touching ``state``."""
    heads, groups = x.shape[1], B.shape[1]
    h = state.cpu().double()[slot_idx.long().cpu()]  # [b, H, P, N]
    x, dt, A = x.cpu().double(), dt.cpu().double(), A.cpu().double()
    if dt_bias is not None:
        dt = dt + dt_bias.cpu().double()
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.cpu().double().repeat_interleave(heads // groups, dim=1)  # [b, H, N]
    C = C.cpu().double().repeat_interleave(heads // groups, dim=1)
    h = h * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", h, C)
    if D is not None:
        y = y + x * D.cpu().double()[:, None]
    if z is not None:
        y = y * F.silu(z.cpu().double())
    return y, h


def make_case(
    seed: int, state_dtype: torch.dtype, dtype: torch.dtype, batch: int, heads: int,
    head_dim: int, d_state: int, groups: int, num_slots: int,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    _, state, _ = strided_views(
        (num_slots, heads, head_dim, d_state), 3, state_dtype, DEVICE, gen, True
    )
    x = rand(heads, batch, head_dim).transpose(0, 1)  # non-contiguous [b, H, P]
    return {
        "state": state,
        "slot_idx": torch.randperm(num_slots, generator=gen)[:batch].int().to(DEVICE),
        "x": x,
        "dt": rand(batch, heads, scale=2.0),
        "A": -torch.rand(heads, generator=gen).add(0.5).to(DEVICE),
        "B": rand(batch, d_state, groups).transpose(1, 2),
        "C": rand(batch, groups, d_state),
        "D": rand(heads, dt=torch.float32),
        "dt_bias": rand(heads, scale=0.5, dt=torch.float32),
        "z": rand(batch, heads, head_dim),
    }


@pytest.mark.parametrize(
    "state_dtype,dtype,batch,heads,head_dim,d_state,groups,options",
    [
        (torch.float32, torch.float32, 3, 4, 16, 16, 1, "D,dt_bias,softplus"),
        (torch.float32, torch.float32, 2, 6, 20, 12, 2, "D,dt_bias,z,softplus"),
        (torch.float32, torch.bfloat16, 4, 4, 32, 16, 4, "D,dt_bias,softplus"),
        (torch.bfloat16, torch.bfloat16, 3, 8, 16, 32, 2, "D,z,softplus"),
        (torch.float32, torch.float32, 2, 2, 8, 8, 1, ""),
    ],
)
def test_state_update_matches_reference(
    state_dtype: torch.dtype, dtype: torch.dtype, batch: int, heads: int, head_dim: int,
    d_state: int, groups: int, options: str,
) -> None:
    case = make_case(5, state_dtype, dtype, batch, heads, head_dim, d_state, groups, 9)
    kwargs = {k: (case[k] if k in options else None) for k in ("D", "dt_bias", "z")}
    before = case["state"].clone()
    args = [case[k] for k in ("state", "slot_idx", "x", "dt", "A", "B", "C")]
    y_ref, h_ref = reference_step(*args, **kwargs, dt_softplus="softplus" in options)
    out = torch.full((batch, heads, head_dim), POISON, dtype=dtype, device=DEVICE)
    mamba2_state_update(*args, **kwargs, dt_softplus="softplus" in options, out=out)
    assert_close("y", out, y_ref, dtype)
    slots = case["slot_idx"].long()
    assert_close("state", case["state"][slots], h_ref, state_dtype)
    untouched = torch.ones(9, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(case["state"][untouched], before[untouched])


def test_negative_slot_rows_are_skipped() -> None:
    case = make_case(2, torch.float32, torch.float32, 3, 2, 8, 8, 1, 4)
    case["slot_idx"][1] = -1
    rows = torch.tensor([0, 2], device=DEVICE)
    names = ("state", "slot_idx", "x", "dt", "A", "B", "C")
    per_row = {k: case[k][rows] for k in ("slot_idx", "x", "dt", "B", "C")}
    y_ref, _ = reference_step(*[per_row.get(k, case[k]) for k in names], case["D"], None,
                              None, True)
    before = case["state"].clone()
    out = torch.full((3, 2, 8), POISON, device=DEVICE)
    mamba2_state_update(*[case[k] for k in names], D=case["D"], out=out)
    assert torch.isnan(out[1]).all()
    assert_close("y", out[rows], y_ref, torch.float32)
    kept = [s for s in range(4) if s not in per_row["slot_idx"].tolist()]
    assert torch.equal(case["state"][kept], before[kept])


def test_dt_round_discretises_as_torch_does_in_bf16() -> None:
    """``dt_round`` must give the values the reference mixer gets from torch ops on bf16
    dt (bias cast, sum, softplus, clamp each rounded): fp32 everywhere else, so any
    difference in dt shows. Large dt makes bf16 rounding visible (spacing ~0.03)."""
    case = make_case(7, torch.float32, torch.float32, 4, 8, 16, 16, 2, 6)
    dt = (case["dt"].abs() * 3 + 2).to(torch.bfloat16)  # [b, H] raw, 2..10
    bias, limit = case["dt_bias"], (2.5, 9.0)
    torch_dt = torch.clamp(F.softplus(dt + bias.to(dt.dtype)), *limit)  # bf16 ops
    args = [case[k] for k in ("slot_idx", "x")]
    rest = [case[k] for k in ("A", "B", "C")]

    def step(dt_in: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        state = case["state"].clone()
        y = mamba2_state_update(state, *args, dt_in, *rest, D=case["D"], **kwargs)
        return y, state

    y_ref, h_ref = step(torch_dt, dt_softplus=False)
    fused = {"dt_bias": bias, "dt_softplus": True, "dt_limit": limit}
    y, h = step(dt, **fused, dt_round=True)
    y_fp32, _ = step(dt, **fused, dt_round=False)
    assert (y - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()
    assert (h - h_ref).abs().max() <= 1e-6 * h_ref.abs().max()
    assert (y_fp32 - y_ref).abs().max() > 1e-4 * y_ref.abs().max()  # rounding matters here
