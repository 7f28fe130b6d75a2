"""Triton Mamba2 prefill scan over a ragged batch against a float64 sequential torch
reference and transformers' chunked scan: strided slot views, initial states read
from slots or zeroed, final states written back in place."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.mamba2_varlen_scan import mamba2_varlen_scan  # noqa: E402


def reference_scan(
    case: dict[str, torch.Tensor], lens: list[int], fresh: list[bool], use: str,
    dt_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 token-by-token scan; returns (y [T, H, P], final states [b, H, P, N])."""
    d = {k: v.cpu().double() for k, v in case.items() if v.is_floating_point()}
    heads, groups = d["x"].shape[1], d["B"].shape[1]
    y = torch.zeros_like(d["x"])
    finals = []
    start = 0
    for b, n in enumerate(lens):
        h = d["state"][int(case["slot_idx"][b])].clone()
        if fresh[b]:
            h.zero_()
        for t in range(start, start + n):
            dt = d["dt"][t] + (d["dt_bias"] if "dt_bias" in use else 0)
            dt = F.softplus(dt).clamp(*dt_limit)  # [H]
            B = d["B"][t].repeat_interleave(heads // groups, 0)  # [H, N]
            C = d["C"][t].repeat_interleave(heads // groups, 0)
            dbx = (dt[:, None] * d["x"][t])[..., None] * B[:, None]  # [H, P, N]
            h = h * torch.exp(dt * d["A"])[:, None, None] + dbx
            y[t] = torch.einsum("hpn,hn->hp", h, C)
            if "D" in use:
                y[t] += d["x"][t] * d["D"][:, None]
            if "z" in use:
                y[t] *= F.silu(d["z"][t])
        finals.append(h)
        start += n
    return y, torch.stack(finals)


def make_case(
    seed: int, state_dtype: torch.dtype, dtype: torch.dtype, lens: list[int], heads: int,
    head_dim: int, d_state: int, groups: int, num_slots: int,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lens)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    state, _ = strided_views((num_slots, heads, head_dim, d_state), 2, state_dtype, DEVICE,
                             gen, True)
    return {
        "state": state,
        "slot_idx": torch.randperm(num_slots, generator=gen)[: len(lens)].int().to(DEVICE),
        "x": rand(heads, tokens, head_dim).transpose(0, 1),
        "dt": rand(tokens, heads),
        "A": -torch.rand(heads, generator=gen).add(0.2).to(DEVICE),
        "B": rand(tokens, groups, d_state, scale=0.5),
        "C": rand(tokens, d_state, groups, scale=0.5).transpose(1, 2),
        "D": rand(heads, dt=torch.float32),
        "dt_bias": rand(heads, scale=0.5, dt=torch.float32),
        "z": rand(tokens, heads, head_dim),
    }


@pytest.mark.parametrize(
    "state_dtype,dtype,lens,heads,head_dim,d_state,groups,use,fresh,dt_limit",
    [
        (torch.float32, torch.float32, [5, 1, 12], 4, 16, 16, 2, "D,dt_bias",
         [False, True, False], (0.0, math.inf)),
        (torch.float32, torch.float32, [7, 3], 2, 20, 8, 1, "D,dt_bias,z", None, (0.01, 1.5)),
        (torch.float32, torch.bfloat16, [9, 4], 4, 16, 32, 4, "D,dt_bias",
         [True, False], (0.0, math.inf)),
        (torch.bfloat16, torch.bfloat16, [6], 2, 8, 16, 1, "z", None, (0.0, math.inf)),
    ],
)
def test_varlen_scan_matches_reference(
    state_dtype: torch.dtype, dtype: torch.dtype, lens: list[int], heads: int, head_dim: int,
    d_state: int, groups: int, use: str, fresh: list[bool] | None,
    dt_limit: tuple[float, float],
) -> None:
    case = make_case(4, state_dtype, dtype, lens, heads, head_dim, d_state, groups, 6)
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                       device=DEVICE)
    y_ref, h_ref = reference_scan(case, lens, fresh or [False] * len(lens), use, dt_limit)
    before = case["state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    flags = None if fresh is None else torch.tensor([not f for f in fresh], device=DEVICE)
    kwargs = {k: (case[k] if k in use else None) for k in ("D", "dt_bias", "z")}
    mamba2_varlen_scan(case["state"], case["slot_idx"], qsl, case["x"], case["dt"], case["A"],
                       case["B"], case["C"], **kwargs, has_initial_state=flags,
                       dt_limit=dt_limit, out=out)
    assert_close("y", out, y_ref, dtype)
    slots = case["slot_idx"].long()
    assert_close("final state", case["state"][slots], h_ref, state_dtype)
    kept = [s for s in range(6) if s not in slots.tolist()]
    assert torch.equal(case["state"][kept], before[kept])


def test_matches_transformers_chunked_scan() -> None:
    """Same function as the SSD chunked scan transformers runs for prefill (its torch
    fallback), with an initial state, several chunks, dt_bias, softplus and a dt clamp."""
    bamba = pytest.importorskip("transformers.models.bamba.modeling_bamba")
    if not hasattr(bamba, "mamba2_chunk_scan"):
        pytest.skip("this transformers version inlines its chunked scan")
    case = make_case(9, torch.float32, torch.float32, [11], 4, 8, 16, 2, 3)
    slot = int(case["slot_idx"][0])
    y_ref, h_ref = bamba.mamba2_chunk_scan(
        case["x"][None], case["dt"][None], case["A"], case["B"][None], case["C"][None], 4,
        D=case["D"], dt_bias=case["dt_bias"], initial_states=case["state"][slot][None].clone(),
        dt_softplus=True, dt_limit=(0.05, 2.0), return_final_states=True,
    )
    qsl = torch.tensor([0, 11], dtype=torch.int32, device=DEVICE)
    out = mamba2_varlen_scan(case["state"], case["slot_idx"][:1], qsl, case["x"], case["dt"],
                             case["A"], case["B"], case["C"], D=case["D"],
                             dt_bias=case["dt_bias"], dt_limit=(0.05, 2.0))
    assert_close("y vs transformers", out, y_ref[0], torch.float32)
    assert_close("state vs transformers", case["state"][slot], h_ref[0], torch.float32)
