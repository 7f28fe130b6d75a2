"""Triton chunked gated delta rule (prefill) against the torch reference and the
sequential kernel: ragged lengths around the chunk size (1, chunk - 1, chunk, chunk + 1,
several chunks) in chunks of 64 and 16, fresh and continuing slots over strided pool
views, fp32 and bf16 inputs and states, more value heads than key heads; prompts split
across calls; the engine's mixed-step split (decode rows on the sequential kernel).

Tolerances (relative Frobenius error, `_triton_cases.TOLERANCE`): fp32 1e-4, since the
chunked form sums the same products in another order (the within-chunk system solved by
forward substitution, decays as differences of cumulative sums); bf16 2e-2, since on the
GPU the tensor-core operands (normalised q and k, the inverse of the chunk's system, the
chunk start states, the corrected values) are rounded to bf16 before the fp32
accumulation, and a bf16 state is rounded when written.
"""

from __future__ import annotations

import pytest
import torch
from _triton_cases import POISON, TOLERANCE, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import deltanet as ref  # noqa: E402
from avmp.kernels.triton.gated_delta import (  # noqa: E402
    gated_delta_chunked,
    gated_delta_varlen,
)
from avmp.kernels.triton.mamba2_chunk_scan import chunk_layout, max_chunks  # noqa: E402

NUM_SLOTS = 7


def offsets(lens: list[int]) -> list[int]:
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return starts


def make_case(
    seed: int, lens: list[int], dtype: torch.dtype, state_dtype: torch.dtype,
    heads: tuple[int, int, int, int],
) -> dict[str, torch.Tensor]:
    """Rule inputs for ``sum(lens)`` tokens (``heads``: key heads, value heads, dk, dv) in
    ``dtype``, g in fp32 as the layer computes it, and a strided pool of states."""
    key_heads, value_heads, dk, dv = heads
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    (state,) = strided_views((NUM_SLOTS, value_heads, dk, dv), 1, state_dtype, DEVICE,
                             generator, permute_inner=True)  # fmt: skip
    return {
        "state": state,
        "q": randn(tokens, key_heads, dk),
        "k": randn(tokens, key_heads, dk),
        "v": randn(tokens, value_heads, dv),
        "g": (-torch.rand(tokens, value_heads, generator=generator) * 0.4).to(DEVICE),
        "beta": torch.rand(tokens, value_heads, generator=generator).to(dtype).to(DEVICE),
    }


def rule(case: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(case[name] for name in ("q", "k", "v", "g", "beta"))


def reference(
    case: dict[str, torch.Tensor], slots: list[int], lens: list[int], init: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference's outputs and final pool, on a CPU copy of the case."""
    states = case["state"].cpu().clone()
    cpu = [t.cpu() for t in rule(case)]
    out = ref.gated_delta_varlen(states, slots, offsets(lens), *cpu, init)
    return out, states


def index(values: list[int] | list[bool]) -> torch.Tensor:
    return torch.tensor(values, device=DEVICE)


@pytest.mark.parametrize(
    "lens,chunk,fresh,dtype,state_dtype,heads",
    [
        # 1, chunk - 1, chunk, chunk + 1 and several chunks (the last one partial)
        ([1, 63, 64, 65, 130], 64, [True, False, True, False, False], torch.float32,
         torch.float32, (1, 2, 16, 24)),
        ([1, 15, 16, 17, 40], 16, None, torch.float32, torch.float32, (2, 4, 16, 40)),
        ([17, 3, 33], 16, [True, True, True], torch.float32, torch.float32, (2, 2, 32, 16)),
        ([9, 16, 35], 16, [False, True, False], torch.bfloat16, torch.float32, (2, 4, 16, 40)),
        ([40, 2], 16, None, torch.bfloat16, torch.bfloat16, (1, 2, 16, 16)),
    ],
)  # fmt: skip
def test_chunked_matches_the_reference(
    lens: list[int], chunk: int, fresh: list[bool] | None, dtype: torch.dtype,
    state_dtype: torch.dtype, heads: tuple[int, int, int, int],
) -> None:
    case = make_case(11, lens, dtype, state_dtype, heads)
    slots = [5, 0, 3, 1, 6][: len(lens)]
    init = [True] * len(lens) if fresh is None else [not f for f in fresh]
    expected, expected_states = reference(case, slots, lens, init)
    before = case["state"].clone()
    out = torch.full(tuple(case["v"].shape), POISON, device=DEVICE)
    flags = None if fresh is None else index(init)
    gated_delta_chunked(case["state"], index(slots), index(offsets(lens)), *rule(case),
                        has_initial_state=flags, out=out, chunk_size=chunk)  # fmt: skip
    assert_close("o", out, expected, dtype)
    # an fp32 state built from bf16 inputs holds their rounding (the tensor-core operands
    # are bf16 on the GPU: 3.0e-3 measured on an H200), so the coarser tolerance
    coarser = max(state_dtype, dtype, key=lambda d: TOLERANCE[d])
    assert_close("final states", case["state"][slots], expected_states[slots], coarser)
    kept = [s for s in range(NUM_SLOTS) if s not in slots]
    assert torch.equal(case["state"][kept], before[kept])


def test_chunked_matches_the_sequential_kernel() -> None:
    """Both Triton forms on one ragged batch: the same function, up to summation order."""
    lens, slots = [5, 33, 1, 18], [2, 4, 0, 6]
    case = make_case(12, lens, torch.float32, torch.float32, (2, 4, 16, 24))
    flags = index([True, False, True, True])
    other = case["state"].clone()
    qsl = index(offsets(lens))
    chunked = gated_delta_chunked(case["state"], index(slots), qsl, *rule(case),
                                  has_initial_state=flags, chunk_size=16)  # fmt: skip
    sequential = gated_delta_varlen(other, index(slots), qsl, *rule(case), has_initial_state=flags)
    assert_close("o", chunked, sequential, torch.float32)
    assert_close("states", case["state"], other, torch.float32)


def test_negative_slots_leave_state_and_output_rows_untouched() -> None:
    lens, slots = [6, 20, 3], [1, -1, 4]
    case = make_case(13, lens, torch.float32, torch.float32, (1, 2, 16, 16))
    before = case["state"].clone()
    out = torch.full(tuple(case["v"].shape), POISON, device=DEVICE)
    gated_delta_chunked(case["state"], index(slots), index(offsets(lens)), *rule(case), out=out,
                        chunk_size=16)  # fmt: skip
    assert torch.isnan(out[6:26]).all(), "rows of a negative slot must stay untouched"
    assert torch.isfinite(out[:6]).all() and torch.isfinite(out[26:]).all()
    assert torch.equal(case["state"][[0, 2, 3, 5, 6]], before[[0, 2, 3, 5, 6]])


def test_prompt_split_across_calls_continues_from_the_slot() -> None:
    """Two fresh prompts prefilled in two calls (the second continuing from the slots)
    give the outputs and final states of one call: chunk boundaries differ, the function
    does not."""
    lens, first = [37, 11], [21, 4]
    case = make_case(14, lens, torch.float32, torch.float32, (2, 4, 16, 24))
    initial = case["state"].clone()
    slots = index([3, 1])
    whole = gated_delta_chunked(case["state"], slots, index(offsets(lens)), *rule(case),
                                has_initial_state=index([False, False]), chunk_size=16)  # fmt: skip
    whole_state = case["state"].clone()

    case["state"].copy_(initial)
    rows = [torch.cat([torch.arange(0, 21), torch.arange(37, 41)]),
            torch.cat([torch.arange(21, 37), torch.arange(41, 48)])]  # fmt: skip
    out = torch.empty_like(whole)
    for part, part_lens, flag in ((0, first, False), (1, [37 - 21, 11 - 4], True)):
        picked = rows[part].to(DEVICE)
        out[picked] = gated_delta_chunked(
            case["state"], slots, index(offsets(part_lens)), *(t[picked] for t in rule(case)),
            has_initial_state=index([flag, flag]), chunk_size=16,
        )  # fmt: skip
    assert_close("o split vs whole", out, whole, torch.float32)
    assert_close("state split vs whole", case["state"], whole_state, torch.float32)


def test_mixed_step_split_as_the_engine_runs_it() -> None:
    """Prompt sequences on the chunked form, decode rows on the sequential kernel,
    padding rows (slot -1) on neither, over one chunk table bounded by the prompts alone
    (as `TritonOps` plans a mixed step): the reference over the whole step."""
    lens = [1, 9, 1, 20, 1, 1]  # decode, prompt, decode, prompt, padding, padding
    slots = [4, 1, 0, 5, -1, -1]
    init = [True, False, True, True, False, False]
    decode = index([True, False, True, False, False, False])
    case = make_case(15, lens, torch.float32, torch.float32, (2, 4, 16, 24))
    expected, expected_states = reference(case, slots, lens, init)
    qsl, tokens, chunk = index(offsets(lens)), sum(lens), 16
    prompt_slots = torch.where(decode, -1, index(slots))
    layout = chunk_layout(qsl, prompt_slots, chunk, tokens,
                          num_chunks=max_chunks(tokens - 2, len(lens) - 2, chunk))  # fmt: skip
    assert (layout.chunk_seq >= 0).sum().item() == 1 + 2  # 9 tokens: one chunk; 20: 16 + 4
    out = torch.full(tuple(case["v"].shape), POISON, device=DEVICE)
    gated_delta_chunked(case["state"], prompt_slots, qsl, *rule(case),
                        has_initial_state=index(init), out=out, layout=layout,
                        chunk_size=chunk)  # fmt: skip
    gated_delta_varlen(case["state"], torch.where(decode, index(slots), -1), qsl, *rule(case),
                       has_initial_state=index(init), out=out)  # fmt: skip
    assert torch.isnan(out[-2:]).all(), "padding rows must stay untouched"
    assert_close("o", out[:-2], expected[:-2], torch.float32)
    assert_close("states", case["state"], expected_states.to(DEVICE), torch.float32)


def test_bad_arguments_are_refused() -> None:
    case = make_case(16, [4], torch.float32, torch.float32, (1, 2, 16, 16))
    slots, qsl = index([0]), index([0, 4])
    with pytest.raises(ValueError, match="power of two >= 16"):
        gated_delta_chunked(case["state"], slots, qsl, *rule(case), chunk_size=24)
    with pytest.raises(ValueError, match="query_start_loc"):
        gated_delta_chunked(case["state"], slots, index([0, 2, 4]), *rule(case))
    with pytest.raises(ValueError, match="beta"):
        q, k, v, g, beta = rule(case)
        gated_delta_chunked(case["state"], slots, qsl, q, k, v, g, beta[:, :1])
