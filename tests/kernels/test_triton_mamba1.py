"""Triton Mamba1 (Jamba) kernels against the torch reference (`reference.mamba1_scan`,
`mamba1_step`, then the mixer's ``silu(gate)``) and transformers' Jamba scan: ragged
batches from and into strided slot views, fresh and continuing slots, fp32 and bf16
states, prompts split across two calls, padding rows left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import reference as ref  # noqa: E402
from avmp.kernels.triton.mamba1 import mamba1_state_update, mamba1_varlen_scan  # noqa: E402

NUM_SLOTS = 6


def make_case(
    seed: int, tokens: int, d_inner: int, d_state: int, dtype: torch.dtype,
    state_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Inputs of ``tokens`` rows; x and z are strided (columns of a transposed tensor),
    the state a non-contiguous view interleaved with another layer's."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    state, _ = strided_views((NUM_SLOTS, d_inner, d_state), 2, state_dtype, DEVICE, gen, True)
    return {
        "state": state,
        "x": rand(d_inner, tokens).t(),
        "dt": rand(tokens, d_inner, scale=0.5),
        # slow decay (|A| dt near 0.05) so a mishandled initial state shows in the outputs
        "A": -(torch.rand(d_inner, d_state, generator=gen) * 0.1 + 0.02).to(DEVICE),
        "B": rand(tokens, d_state, scale=0.5),
        "C": rand(tokens, d_state, scale=0.5),
        "D": rand(d_inner, dt=torch.float32),
        "dt_bias": rand(d_inner, scale=0.5, dt=torch.float32) - 2.0,
        "z": rand(d_inner, tokens).t(),
    }


def reference(
    case: dict[str, torch.Tensor], slots: list[int], lens: list[int], fresh: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's reference path in float32: ``(y [T, I], final states [b, I, S])``."""
    d = {k: v.cpu().float() for k, v in case.items()}
    dt = F.softplus(d["dt"] + d["dt_bias"])
    y = torch.empty_like(d["x"])
    finals, start = [], 0
    for slot, n, new in zip(slots, lens, fresh, strict=True):
        h = torch.zeros_like(d["state"][slot]) if new else d["state"][slot].clone()
        rows = slice(start, start + n)
        out = ref.mamba1_scan(d["x"][rows], dt[rows], d["A"], d["B"][rows], d["C"][rows],
                              d["D"], h)
        y[rows] = out * F.silu(d["z"][rows])
        finals.append(h)
        start += n
    return y, torch.stack(finals)


def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def scan(
    case: dict[str, torch.Tensor], slots: list[int], lens: list[int], fresh: list[bool] | None,
    rows: slice | None = None, out: torch.Tensor | None = None, block_t: int | None = None,
) -> torch.Tensor:
    """`mamba1_varlen_scan` of the case's tokens ``rows`` (all by default)."""
    rows = rows or slice(0, case["x"].shape[0])
    per_token = {k: case[k][rows] for k in ("x", "dt", "B", "C", "z")}
    flags = None if fresh is None else torch.tensor([not f for f in fresh], device=DEVICE)
    return mamba1_varlen_scan(
        case["state"], torch.tensor(slots, dtype=torch.int32, device=DEVICE), offsets(lens),
        per_token["x"], per_token["dt"], case["A"], per_token["B"], per_token["C"],
        case["D"], case["dt_bias"], per_token["z"], has_initial_state=flags, out=out,
        block_t=block_t,
    )


@pytest.mark.parametrize(
    "dtype,state_dtype,lens,d_inner,d_state,fresh",
    [
        (torch.float32, torch.float32, [5, 1, 12], 40, 16, [False, True, False]),
        (torch.float32, torch.float32, [3, 9], 96, 8, None),
        (torch.bfloat16, torch.float32, [9, 4], 64, 16, [True, False]),
        (torch.bfloat16, torch.bfloat16, [6, 2], 48, 16, [False, False]),
    ],
)
def test_varlen_scan_matches_reference(
    dtype: torch.dtype, state_dtype: torch.dtype, lens: list[int], d_inner: int, d_state: int,
    fresh: list[bool] | None,
) -> None:
    case = make_case(1, sum(lens), d_inner, d_state, dtype, state_dtype)
    slots = [4, 0, 2][: len(lens)]
    y_ref, h_ref = reference(case, slots, lens, fresh or [False] * len(lens))
    before = case["state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    scan(case, slots, lens, fresh, out=out)
    assert_close("y", out, y_ref, dtype)
    assert_close("final state", case["state"][slots], h_ref, state_dtype)
    kept = [s for s in range(NUM_SLOTS) if s not in slots]
    assert torch.equal(case["state"][kept], before[kept])


@pytest.mark.parametrize("block_t", [1, 4, None])
def test_token_blocks_match_reference(block_t: int | None) -> None:
    """One token after another, blocks of 4 and the default block (16 for d_state 16):
    sequences shorter than a block, of exactly one block, and over several blocks with
    a partial last one."""
    lens, slots, fresh = [37, 3, 16, 1], [1, 5, 0, 3], [True, False, False, False]
    case = make_case(8, sum(lens), 24, 16, torch.float32, torch.float32)
    y_ref, h_ref = reference(case, slots, lens, fresh)
    out = scan(case, slots, lens, fresh, block_t=block_t)
    assert_close("y", out, y_ref, torch.float32)
    assert_close("final state", case["state"][slots], h_ref, torch.float32)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prompts_split_across_two_calls_match_one_call(state_dtype: torch.dtype) -> None:
    """Two fresh prompts scanned in one call, then again as a first chunk (fresh) and a
    second chunk continuing from the slots: same outputs and final states."""
    lens, first = [10, 7], [4, 5]
    case = make_case(2, sum(lens), 32, 16, torch.float32, state_dtype)
    slots = [1, 3]
    whole = scan(case, slots, lens, [True, True]).clone()
    h_whole = case["state"][slots].clone()
    case["state"][slots] = torch.randn_like(h_whole)  # stale bytes the fresh flag must skip
    starts = [0, lens[0]]
    head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, first, strict=True)])
    tail = torch.cat([torch.arange(s + n, s + m)
                      for s, n, m in zip(starts, first, lens, strict=True)])
    parts = []
    rest = [m - n for n, m in zip(first, lens, strict=True)]
    for index, chunk, fresh in ((head, first, True), (tail, rest, False)):
        sub = dict(case, **{k: case[k][index] for k in ("x", "dt", "B", "C", "z")})
        parts.append(scan(sub, slots, chunk, [fresh, fresh]))
    split = torch.empty_like(whole)
    split[head], split[tail] = parts
    tolerance = 1e-5 if state_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(split, whole, rtol=tolerance, atol=tolerance)
    assert_close("final state", case["state"][slots], h_whole, state_dtype)


def test_padding_sequences_touch_nothing() -> None:
    """A sequence with slot -1 (a padding row of a captured step) writes neither its
    tokens' outputs nor any slot; the real sequences beside it are unaffected."""
    lens, slots = [4, 3, 5], [2, -1, 5]
    case = make_case(3, sum(lens), 24, 8, torch.float32, torch.float32)
    before = case["state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, device=DEVICE)
    scan(case, slots, lens, [False, False, True], out=out)
    assert torch.isnan(out[4:7]).all()
    real = [0, 1, 2, 3, 7, 8, 9, 10, 11]
    sub = dict(case, **{k: case[k][real] for k in ("x", "dt", "B", "C", "z")}, state=before)
    y_ref, h_ref = reference(sub, [2, 5], [4, 5], [False, True])
    assert_close("y", out[real], y_ref, torch.float32)
    assert_close("final state", case["state"][[2, 5]], h_ref, torch.float32)
    assert torch.equal(case["state"][[0, 1, 3, 4]], before[[0, 1, 3, 4]])


@pytest.mark.parametrize("dtype,state_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
])
def test_state_update_matches_reference_step(
    dtype: torch.dtype, state_dtype: torch.dtype
) -> None:
    """One token per row in place in the rows' slots, a padding row (slot -1) between
    them, against `reference.mamba1_step` and the gate."""
    case = make_case(4, 4, 72, 16, dtype, state_dtype)
    slot_list = [3, -1, 0, 5]
    real, real_slots = [0, 2, 3], [3, 0, 5]
    before = case["state"].clone()
    d = {k: v.cpu().float() for k, v in case.items()}
    h = d["state"][real_slots].clone()
    dt = F.softplus(d["dt"][real] + d["dt_bias"])
    y_ref = ref.mamba1_step(h, d["x"][real], dt, d["A"], d["B"][real], d["C"][real], d["D"])
    y_ref = y_ref * F.silu(d["z"][real])
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    mamba1_state_update(
        case["state"], torch.tensor(slot_list, device=DEVICE), case["x"], case["dt"],
        case["A"], case["B"], case["C"], case["D"], case["dt_bias"], case["z"], out=out,
    )  # fmt: skip
    assert_close("y", out[real], y_ref, dtype)
    assert torch.isnan(out[1].float()).all()
    assert_close("state", case["state"][real_slots], h, state_dtype)
    kept = [1, 2, 4]
    assert torch.equal(case["state"][kept], before[kept])


def test_state_update_equals_one_token_scans() -> None:
    """The decode update and the varlen scan over one-token sequences are one function,
    without the optional D, bias and gate too. Equal to fp32 rounding, not bit for bit:
    on an H200 the two kernels compile the same sums into different instruction sequences
    (fused multiply-adds, the scan's block composition) and differed by 4e-7 in outputs
    of order 0.1; Triton's interpreter (numpy) gives identical bits."""
    case = make_case(5, 3, 40, 16, torch.float32, torch.float32)
    slots = torch.tensor([5, 1, 2], device=DEVICE)
    start = case["state"].clone()
    inputs = (case["x"], case["dt"], case["A"], case["B"], case["C"])
    y_step = mamba1_state_update(case["state"], slots, *inputs, dt_softplus=False)
    h_step = case["state"].clone()
    case["state"].copy_(start)
    y_scan = mamba1_varlen_scan(case["state"], slots, offsets([1, 1, 1]), *inputs,
                                dt_softplus=False)
    torch.testing.assert_close(y_scan, y_step, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(case["state"], h_step, rtol=1e-5, atol=1e-6)


def test_matches_transformers_jamba_scan() -> None:
    """Same function as transformers' Jamba ``mamba_selective_scan`` (zero initial
    state, dt bias, softplus, D and the z gate) and its one-token update after it."""
    jamba = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    tokens, d_inner, d_state = 9, 32, 16
    case = make_case(6, tokens + 1, d_inner, d_state, torch.float32, torch.float32)
    c = {k: v.cpu() for k, v in case.items()}
    prompt = slice(0, tokens)
    y_hf, h_hf = jamba.mamba_selective_scan(
        c["x"][prompt].t()[None], c["dt"][prompt].t()[None], c["A"], c["B"][prompt].t()[None],
        c["C"][prompt].t()[None], D=c["D"], z=c["z"][prompt].t()[None],
        delta_bias=c["dt_bias"], delta_softplus=True, return_last_state=True,
    )  # fmt: skip
    out = scan(case, [2], [tokens], [True], rows=prompt)
    assert_close("y vs transformers", out, y_hf[0].t(), torch.float32)
    assert_close("state vs transformers", case["state"][2], h_hf[0], torch.float32)
    last = slice(tokens, tokens + 1)
    state = h_hf.clone()
    y_hf = jamba.mamba_selective_state_update(
        state, c["x"][last], c["dt"][last], c["A"], c["B"][last], c["C"][last], c["D"],
        dt_bias=c["dt_bias"], dt_softplus=True, z=c["z"][last],
    )  # fmt: skip
    y = mamba1_state_update(
        case["state"], torch.tensor([2], device=DEVICE), case["x"][last], case["dt"][last],
        case["A"], case["B"][last], case["C"][last], case["D"], case["dt_bias"],
        case["z"][last],
    )  # fmt: skip
    assert_close("decode y vs transformers", y, y_hf, torch.float32)
    assert_close("decode state vs transformers", case["state"][2], state[0], torch.float32)


def test_bad_shapes_are_refused() -> None:
    case = make_case(7, 4, 16, 8, torch.float32, torch.float32)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc"):
        mamba1_varlen_scan(case["state"], slots, offsets([4]), case["x"], case["dt"],
                           case["A"], case["B"], case["C"])
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        mamba1_varlen_scan(case["state"], slots[:1], offsets([4]), case["x"], case["dt"],
                           case["A"], case["B"], case["C"], block_t=3)
    with pytest.raises(ValueError, match="A must have shape"):
        mamba1_state_update(case["state"], torch.arange(4, device=DEVICE), case["x"],
                            case["dt"], case["A"].t(), case["B"], case["C"])
