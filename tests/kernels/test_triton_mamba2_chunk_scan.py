"""Triton chunked (SSD) Mamba2 scan over ragged batches against the float64 sequential
reference and the varlen (sequential) kernel: chunks that end exactly at, before and past
a sequence's end, fresh and continuing slots, strided slot views in any order, groups
shared by heads, fp32 and bf16 states, with and without the gate; prompts split across
calls; the engine's mixed-step split (decodes on the varlen kernel).

Tolerances (relative Frobenius error, `_triton_cases.TOLERANCE`): fp32 1e-4, since the
chunked form sums the same products in another order and its decay exponents are
differences of cumulative sums; bf16 2e-2, since the output itself is bf16 (~4e-3 per
element) and on the GPU the tensor-core operands (decay-weighted CB, chunk states, B
scaled by dt and decay) are rounded to bf16 before the fp32 accumulation.
"""

from __future__ import annotations

import math

import pytest
import torch
from _triton_cases import POISON, TOLERANCE, assert_close
from test_triton_mamba2_varlen_scan import make_case, reference_scan

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.mamba2_chunk_scan import (  # noqa: E402
    ChunkScanTiles,
    ScanTiles,
    StatePassingTiles,
    chunk_layout,
    mamba2_chunk_scan,
    max_chunks,
)
from avmp.kernels.triton.mamba2_varlen_scan import mamba2_varlen_scan  # noqa: E402

NUM_SLOTS = 6


def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def inputs(case: dict[str, torch.Tensor], use: str) -> dict[str, torch.Tensor | None]:
    return {k: (case[k] if k in use else None) for k in ("D", "dt_bias", "z")}


@pytest.mark.parametrize(
    "state_dtype,dtype,lens,chunk,heads,head_dim,d_state,groups,use,fresh,dt_limit",
    [
        # 1, chunk - 1, chunk, chunk + 1 and several chunks (the last one partial)
        (torch.float32, torch.float32, [1, 7, 8, 9, 20], 8, 4, 16, 16, 2, "D,dt_bias",
         [False, True, False, False, True], (0.0, math.inf)),
        (torch.float32, torch.float32, [17, 3, 33], 16, 2, 8, 8, 1, "D,dt_bias,z", None,
         (0.01, 1.5)),
        (torch.float32, torch.bfloat16, [12, 25], 8, 4, 8, 16, 4, "D,dt_bias",
         [True, False], (0.0, math.inf)),
        (torch.bfloat16, torch.bfloat16, [40], 16, 2, 16, 8, 1, "z", None, (0.0, math.inf)),
    ],
)
def test_chunk_scan_matches_sequential_reference(
    state_dtype: torch.dtype, dtype: torch.dtype, lens: list[int], chunk: int, heads: int,
    head_dim: int, d_state: int, groups: int, use: str, fresh: list[bool] | None,
    dt_limit: tuple[float, float],
) -> None:
    case = make_case(7, state_dtype, dtype, lens, heads, head_dim, d_state, groups, NUM_SLOTS)
    y_ref, h_ref = reference_scan(case, lens, fresh or [False] * len(lens), use, dt_limit)
    before = case["state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    flags = None if fresh is None else torch.tensor([not f for f in fresh], device=DEVICE)
    mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), case["x"], case["dt"],
                      case["A"], case["B"], case["C"], chunk, **inputs(case, use),
                      has_initial_state=flags, dt_limit=dt_limit, out=out)
    assert_close("y", out, y_ref, dtype)
    slots = case["slot_idx"].long()
    # an fp32 state built from bf16 inputs holds their rounding: on the GPU the chunk
    # states' tensor-core operands are bf16 (measured 1.6e-3 on an H200), so the state
    # is held to the coarser of the two dtypes' tolerances
    coarser = max(state_dtype, dtype, key=lambda d: TOLERANCE[d])
    assert_close("final state", case["state"][slots], h_ref, coarser)
    kept = [s for s in range(NUM_SLOTS) if s not in slots.tolist()]
    assert torch.equal(case["state"][kept], before[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [12, 24])
def test_chunk_size_not_a_multiple_of_the_source_tile(chunk: int, dtype: torch.dtype) -> None:
    """A chunk size that 16-token source tiles do not divide (12: one ragged tile; 24: a
    whole tile below the diagonal, then a ragged one): the readout's diagonal tiles mask
    the columns past the chunk in the load, where a divisible size reads them whole."""
    lens = [5, chunk, chunk + 1, 3 * chunk + 7]
    case = make_case(9, torch.float32, dtype, lens, 2, 16, 16, 1, NUM_SLOTS)
    y_ref, h_ref = reference_scan(case, lens, [False, True, False, True], "D,dt_bias,z",
                                  (0.0, math.inf))
    tiles = ScanTiles().with_kernel("chunk_scan", ChunkScanTiles(
        block_tokens=16, block_p=16, block_state=16, block_j=16))
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    flags = torch.tensor([True, False, True, False], device=DEVICE)
    mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), case["x"], case["dt"],
                      case["A"], case["B"], case["C"], chunk, **inputs(case, "D,dt_bias,z"),
                      has_initial_state=flags, out=out, tiles=tiles)
    assert_close("y", out, y_ref, dtype)
    slots = case["slot_idx"].long()
    assert_close("final state", case["state"][slots], h_ref, dtype)


@pytest.mark.parametrize("prefetch", StatePassingTiles.PREFETCH)
@pytest.mark.parametrize("block_flat", [32, 256], ids=["flat32", "flat256"])
def test_many_chunks_per_sequence_each_with_its_own_decay(prefetch: int, block_flat: int) -> None:
    """The state passing's loop over long runs of chunks (24, 9 and 1; odd and even counts
    for the 2-deep prefetch), state blocks of a quarter or all of a head's state. dt is
    small and spread (softplus of N(-3.5, 0.7)), so that each 4-token chunk keeps 74-95%
    of its state, each chunk by another factor, and 3-6% of the slot's state is left
    after 24 chunks: a decay taken from the wrong chunk, or a state passed one chunk too
    far, shows in every later output."""
    lens, chunk = [4 * 23 + 1, 4 * 9, 2], 4
    case = make_case(13, torch.float32, torch.float32, lens, 2, 8, 16, 1, NUM_SLOTS)
    gen = torch.Generator().manual_seed(14)
    case["dt"] = (torch.randn(tuple(case["dt"].shape), generator=gen) * 0.7 - 3.5).to(DEVICE)
    fresh = [False, True, False]
    y_ref, h_ref = reference_scan(case, lens, fresh, "D", (0.0, math.inf))
    tiles = ScanTiles(state_passing=StatePassingTiles(num_warps=1, block_flat=block_flat,
                                                      prefetch=prefetch))
    out = torch.full(tuple(case["x"].shape), POISON, device=DEVICE)
    mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), case["x"], case["dt"],
                      case["A"], case["B"], case["C"], chunk, D=case["D"],
                      has_initial_state=torch.tensor([not f for f in fresh], device=DEVICE),
                      out=out, tiles=tiles)
    assert_close("y", out, y_ref, torch.float32)
    assert_close("final state", case["state"][case["slot_idx"].long()], h_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scan_matches_varlen_kernel_with_torch_rounding(dtype: torch.dtype) -> None:
    """The engine's call (dt discretised with torch's roundings, decode rows of one token
    after context mixed in): the two kernels are interchangeable."""
    lens = [1, 15, 16, 17, 1]
    case = make_case(11, torch.float32, dtype, lens, 4, 16, 16, 2, NUM_SLOTS)
    flags = torch.tensor([1, 0, 1, 0, 1], dtype=torch.int32, device=DEVICE)
    states = case["state"].clone()
    args = (case["x"], case["dt"], case["A"], case["B"], case["C"])
    kwargs = dict(**inputs(case, "D,dt_bias"), has_initial_state=flags, dt_limit=(0.0, 4.0),
                  dt_round=True)
    theirs = mamba2_varlen_scan(states, case["slot_idx"], offsets(lens), *args, **kwargs)
    ours = mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), *args, 16, **kwargs)
    assert_close("y vs varlen", ours, theirs.float(), dtype)
    # the fp32 state from bf16 inputs: bf16's tolerance, as in the reference test above
    assert_close("state vs varlen", case["state"], states, dtype)


def test_prompt_split_across_calls_continues_from_the_slot() -> None:
    """Two fresh prompts prefilled in two calls (the second continuing from the slots)
    give the outputs and final states of one call: chunk boundaries differ, the function
    does not."""
    lens, first = [30, 11], [13, 4]
    case = make_case(3, torch.float32, torch.float32, lens, 2, 16, 8, 1, NUM_SLOTS)
    initial = case["state"].clone()
    kwargs = inputs(case, "D,dt_bias,z")
    fresh = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    whole = mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), case["x"],
                              case["dt"], case["A"], case["B"], case["C"], 8, **kwargs,
                              has_initial_state=fresh)
    whole_state = case["state"].clone()

    case["state"].copy_(initial)
    rows = [torch.cat([torch.arange(0, 13), torch.arange(30, 34)]),
            torch.cat([torch.arange(13, 30), torch.arange(34, 41)])]
    out = torch.empty_like(whole)
    for part, part_lens, flag in ((0, first, 0), (1, [30 - 13, 11 - 4], 1)):
        index = rows[part].to(DEVICE)
        pick = {k: (v[index] if k == "z" else v) for k, v in kwargs.items() if v is not None}
        out[index] = mamba2_chunk_scan(
            case["state"], case["slot_idx"], offsets(part_lens), case["x"][index],
            case["dt"][index], case["A"], case["B"][index], case["C"][index], 8, **pick,
            has_initial_state=torch.full((2,), flag, dtype=torch.int32, device=DEVICE))
    assert_close("y split vs whole", out, whole, torch.float32)
    assert_close("state split vs whole", case["state"], whole_state, torch.float32)


def test_mixed_step_split_as_the_engine_runs_it() -> None:
    """Prompt chunks on the chunked scan, decode rows on the varlen kernel, padding rows
    (slot -1) on neither, over one precomputed chunk table bounded by the prompts alone:
    the outputs and states of the varlen kernel over the whole step."""
    lens = [1, 9, 1, 20, 1, 1]  # decode, prompt, decode, prompt, padding, padding
    slots = torch.tensor([4, 1, 0, 5, -1, -1], dtype=torch.int32, device=DEVICE)
    flags = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.int32, device=DEVICE)
    decode = torch.tensor([True, False, True, False, False, False], device=DEVICE)
    case = make_case(5, torch.float32, torch.float32, lens, 2, 8, 16, 2, NUM_SLOTS)
    qsl, tokens, chunk = offsets(lens), sum(lens), 8
    args = (case["x"], case["dt"], case["A"], case["B"], case["C"])
    kwargs = dict(**inputs(case, "D,dt_bias"), has_initial_state=flags, dt_round=True)
    expected_states = case["state"].clone()
    expected = mamba2_varlen_scan(expected_states, slots, qsl, *args, **kwargs)

    prompt_slots = torch.where(decode, -1, slots)
    layout = chunk_layout(qsl, prompt_slots, chunk, tokens,
                          num_chunks=max_chunks(tokens - 2, len(lens) - 2, chunk))
    assert (layout.chunk_seq >= 0).sum().item() == 2 + 3  # 9 tokens: 8 + 1; 20: 8 + 8 + 4
    out = torch.full(tuple(case["x"].shape), POISON, device=DEVICE)
    mamba2_chunk_scan(case["state"], prompt_slots, qsl, *args, chunk, **kwargs, out=out,
                      layout=layout)
    mamba2_varlen_scan(case["state"], torch.where(decode, slots, -1), qsl, *args, **kwargs,
                       out=out)
    assert torch.isnan(out[-2:]).all(), "padding rows must stay untouched"
    assert_close("y", out[:-2], expected[:-2], torch.float32)
    assert_close("states", case["state"], expected_states, torch.float32)


def test_chunk_layout_never_straddles_sequences() -> None:
    lens = [300, 1, 44, 0, 5]
    slots = torch.tensor([2, 0, 1, 3, -1], dtype=torch.int32, device=DEVICE)
    layout = chunk_layout(offsets(lens), slots, 256, sum(lens))
    assert layout.chunk_seq.shape[0] == max_chunks(350, 5, 256) == 7
    assert layout.chunk_seq.tolist() == [0, 0, 1, 2, -1, -1, -1]
    assert layout.chunk_start.tolist()[:4] == [0, 256, 300, 301]
    assert layout.cu_chunks.tolist() == [0, 2, 3, 4, 4, 4]


def test_bad_arguments_are_refused() -> None:
    case = make_case(1, torch.float32, torch.float32, [4], 2, 8, 8, 1, 2)
    args = (case["state"], case["slot_idx"][:1], offsets([4]), case["x"], case["dt"], case["A"])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        mamba2_chunk_scan(*args, case["B"], case["C"], 0)
    with pytest.raises(ValueError, match="B must have x's dtype"):
        mamba2_chunk_scan(*args, case["B"].double(), case["C"], 8)
