"""skinny_linear against torch.nn.functional.linear: decode batch sizes, shapes that are
not multiples of the blocks, split-K (deterministic), bias, strided views, the default
and decode config rules, input validation; on Hopper GPUs TMA loads, dependent launches
and L2 prefetches, chained in CUDA graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from _triton_cases import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.activations import relu_squared, silu_mul  # noqa: E402
from avmp.kernels.triton.conv1d_update import conv1d_update  # noqa: E402
from avmp.kernels.triton.skinny_linear import (  # noqa: E402
    PIPELINE_BUDGET_BYTES,
    ActEpilogue,
    ConvEpilogue,
    SkinnyConfig,
    balanced_config,
    decode_config,
    default_config,
    num_sms,
    skinny_linear,
    stream_parts,
    tiles,
    tma_fits,
)

SMALL = SkinnyConfig(block_m=16, block_n=16, block_k=32, split_k=1)


def make_inputs(
    m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
               for shape in ((m, k), (n, k), (n,)))
    return x, w, b


CASES = [  # (M, N, K, config): N and K off the block multiples, M across tiles
    (1, 50, 70, SMALL),
    (7, 40, 96, dataclasses.replace(SMALL, split_k=2)),
    (64, 48, 100, SkinnyConfig(block_m=64, block_n=32, block_k=16, split_k=3)),
    (130, 33, 64, SkinnyConfig(block_m=64, block_n=16, block_k=32, split_k=1)),
    (130, 24, 80, SkinnyConfig(block_m=256, block_n=16, block_k=16, split_k=4)),
]


@pytest.mark.parametrize(("m", "n", "k", "config"), CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_functional_linear(
    m: int, n: int, k: int, config: SkinnyConfig, with_bias: bool
) -> None:
    x, w, b = make_inputs(m, n, k, torch.bfloat16)
    bias = b if with_bias else None
    out = skinny_linear(x, w, bias, config)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert_close("skinny_linear", out, F.linear(x, w, bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_other_dtypes(dtype: torch.dtype, split_k: int) -> None:
    x, w, b = make_inputs(5, 36, 72, dtype)
    out = skinny_linear(x, w, b, dataclasses.replace(SMALL, split_k=split_k))
    assert out.dtype == dtype
    assert_close("skinny_linear", out, F.linear(x, w, b), dtype)


def test_default_config_is_used_without_one() -> None:
    x, w, b = make_inputs(3, 70, 48, torch.bfloat16)
    assert_close("default", skinny_linear(x, w, b), F.linear(x, w, b), torch.bfloat16)


def test_split_k_gives_the_same_bits_every_call() -> None:
    x, w, b = make_inputs(9, 40, 200, torch.bfloat16, seed=1)
    config = SkinnyConfig(block_m=16, block_n=16, block_k=32, split_k=4)
    first, second = skinny_linear(x, w, b, config), skinny_linear(x, w, b, config)
    assert torch.equal(first, second)
    assert_close("split", first, skinny_linear(x, w, b, SMALL), torch.bfloat16)


@pytest.mark.parametrize("split_k", [1, 2])
def test_strided_x_and_out_written_in_place(split_k: int) -> None:
    x, w, b = make_inputs(6, 24, 40, torch.float32)
    x = x.T.contiguous().T  # [6, 40] with strides (1, 6): a transposed view
    host = torch.full((6, 50), float("nan"), device=DEVICE)
    out = host[:, 10:34]  # row stride 50: a column slice of a wider buffer
    result = skinny_linear(x, w, b, dataclasses.replace(SMALL, split_k=split_k), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close("strided", out, F.linear(x, w, b), torch.float32)
    assert host[:, :10].isnan().all() and host[:, 34:].isnan().all()  # nothing else written


def test_empty_dimensions() -> None:
    x, w, b = make_inputs(4, 8, 0, torch.float32)
    assert torch.equal(skinny_linear(x, w, b), b.expand(4, 8))
    assert torch.equal(skinny_linear(x, w), torch.zeros(4, 8, device=DEVICE))
    assert skinny_linear(x[:0], w).shape == (0, 8)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
def test_split_k_captures_in_a_cuda_graph() -> None:
    x, w, b = make_inputs(64, 1024, 4096, torch.bfloat16)
    config = SkinnyConfig(block_m=64, block_n=64, block_k=128, split_k=4)
    skinny_linear(x, w, b, config)  # compiled before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = skinny_linear(x, w, b, config)
    x.mul_(-1)  # the graph reads x again on replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, skinny_linear(x, w, b, config))
    assert_close("graph", captured, F.linear(x, w, b), torch.bfloat16)


def _bad_inputs() -> list[tuple[str, dict[str, torch.Tensor | None]]]:
    x, w, b = make_inputs(4, 8, 16, torch.float32)
    return [
        ("x must be", {"x": x[None]}),
        ("x must be one of", {"x": x.long(), "weight": w.long()}),
        ("weight must have x's dtype", {"weight": w.half()}),
        (r"weight must be \[N, 16\]", {"weight": w[:, :8]}),
        ("contiguous along K", {"weight": w.T.contiguous().T}),
        ("bias must have shape", {"bias": b[:4]}),
        ("bias must have x's dtype", {"bias": b.half()}),
        ("out must have shape", {"out": torch.empty(8, 4, device=DEVICE)}),
        ("out must have x's dtype", {"out": torch.empty(4, 8, device=DEVICE).half()}),
    ]


@pytest.mark.parametrize(("match", "override"), _bad_inputs(), ids=lambda v: str(v)[:24])
def test_rejects_mismatched_inputs(match: str, override: dict[str, torch.Tensor | None]) -> None:
    x, w, b = make_inputs(4, 8, 16, torch.float32)
    kwargs: dict[str, torch.Tensor | None] = {"x": x, "weight": w, "bias": b, "out": None}
    with pytest.raises(ValueError, match=match):
        skinny_linear(**(kwargs | override))  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"block_m": 8}, {"block_n": 48}, {"block_k": 1024}, {"block_m": 512}, {"split_k": 0},
    {"num_warps": 3}, {"num_stages": 0}, {"block_n": True},
])  # fmt: skip
def test_config_rejects_invalid_fields(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        SkinnyConfig(**fields)


def test_config_round_trips_through_a_dict() -> None:
    config = SkinnyConfig(32, 128, 64, 4, 8, 3)
    assert SkinnyConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("m", "n", "k"), [
    (1, 4096, 21504), (8, 1024, 4096), (64, 18560, 4096), (130, 4096, 8192),
    (256, 131072, 4096), (300, 512, 2048), (1, 16, 16),
])  # fmt: skip
def test_default_config_rules(m: int, n: int, k: int) -> None:
    sms = 132
    config = default_config(m, n, k, sms)
    assert config.block_m == min(256, max(16, 1 << (m - 1).bit_length()))
    assert config.pipeline_bytes(2) <= PIPELINE_BUDGET_BYTES
    tiles = -(-n // config.block_n) * -(-m // config.block_m)
    programs = tiles * config.split_k
    if config.split_k > 1:  # split only while the tiles alone are too few
        assert tiles * config.split_k // 2 < 2 * sms
        assert -(-k // config.block_k) // config.split_k >= 4  # each part keeps 4 K steps
    else:
        assert programs >= 2 * sms or -(-k // config.block_k) < 8


def test_default_config_splits_narrow_outputs_only() -> None:
    assert default_config(64, 4096, 21504, 132).split_k > 1  # 64 tiles on 132 SMs
    assert default_config(64, 131072, 4096, 132).split_k == 1  # 2048 tiles
    assert default_config(64, 4096, 21504, 1).split_k == 1  # one SM: nothing to fill
    assert num_sms(torch.device("cpu")) == 1


@pytest.mark.parametrize(("m", "n", "k", "split", "long_split", "long_stages"), [
    # 32 tiles: 4 parts keep 128 programs on 132 SMs; long parts: 2 of 16 K steps
    (64, 2048, 4096, 4, 2, 6),
    (64, 2048, 8192, 4, 4, 6),  # 4 parts of 16 steps either way
    (64, 2048, 2048, 4, 2, 4),  # in two at least: 2 parts of 8 steps, short ones
    (64, 3072, 2048, 2, 2, 4),
    (64, 8512, 2048, 1, 1, 3),  # 133 tiles fill the SMs alone
    (64, 16384, 2048, 1, 1, 3),
    (8, 4096, 8192, 2, 2, 6),
    (64, 2048, 256, 1, 1, 3),  # 2 K steps: too few to split
    (1, 16, 16, 1, 1, 3),
])  # fmt: skip
def test_decode_config_splits_within_one_program_per_sm(
    m: int, n: int, k: int, split: int, long_split: int, long_stages: int
) -> None:
    config = decode_config(m, n, k, 132, long_parts=False)
    assert config.split_k == split
    assert (config.block_n, config.block_k, config.tma) == (64, 128, True)
    assert config.num_stages == (3 if split == 1 else 4)
    assert config.block_m == max(16, 1 << (m - 1).bit_length())
    long = decode_config(m, n, k, 132)
    assert (long.split_k, long.num_stages) == (long_split, long_stages)
    assert dataclasses.replace(long, split_k=split, num_stages=config.num_stages) == config
    assert long.pipeline_bytes(2) <= 192 << 10
    assert decode_config(m, n, k, 1).split_k == 1
    with pytest.raises(ValueError, match="must be >= 1"):
        decode_config(m, n, 0, 132)


def test_long_parts_stay_within_the_shared_memory_budget_in_fp32() -> None:
    config = decode_config(64, 2048, 8192, 132, element_size=4)
    assert (config.split_k, config.block_k) == (4, 64)
    assert config.num_stages == 6 and config.pipeline_bytes(4) <= 192 << 10


def test_config_round_trips_tma_and_rejects_a_non_bool() -> None:
    config = SkinnyConfig(64, 64, 128, 4, 4, 4, tma=True)
    assert SkinnyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="tma"):
        SkinnyConfig(tma=1)  # type: ignore[arg-type]


def test_tma_config_computes_the_same_where_tma_is_not_available() -> None:
    """Off Hopper (and on the CPU) a TMA config runs the pointer kernel, same tiling."""
    x, w, b = make_inputs(24, 80, 256, torch.bfloat16)
    config = SkinnyConfig(32, 32, 64, 2, 4, 3, tma=True)
    if DEVICE.type == "cpu":
        assert not tma_fits(x, w, config)
    out = skinny_linear(x, w, b, config, pdl=False, prefetch_bytes=4096)
    assert_close("tma config", out, F.linear(x, w, b), torch.bfloat16)


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k", "split"), [(7, 40, 96, 2), (64, 130, 512, 4), (3, 16, 64, 3)]
)
def test_folded_parts_equal_the_reduce_kernel_and_leave_counters_zero(
    m: int, n: int, k: int, split: int, tma: bool
) -> None:
    """With counters, the last part of each tile sums the parts in the GEMM's own launch:
    the bits the second kernel gives, and every counter back at zero."""
    x, w, b = make_inputs(m, n, k, torch.bfloat16, seed=split)
    config = SkinnyConfig(max(16, 1 << (m - 1).bit_length()), 16, 32, split, 4, 2, tma=tma)
    counters = torch.zeros(tiles(m, n, config) + 3, dtype=torch.int32, device=DEVICE)
    for bias in (None, b):
        folded = skinny_linear(x, w, bias, config, counters=counters)
        assert torch.equal(folded, skinny_linear(x, w, bias, config))
        assert not counters.any()
    assert_close("folded", folded, F.linear(x, w, b), torch.bfloat16)


def test_rejects_bad_counters() -> None:
    x, w, _ = make_inputs(4, 64, 64, torch.bfloat16)
    config = SkinnyConfig(16, 16, 16, 2)
    for counters, match in [
        (torch.zeros(4, dtype=torch.int64, device=DEVICE), "int32"),
        (torch.zeros(2, 4, dtype=torch.int32, device=DEVICE), "1-D"),
        (torch.zeros(3, dtype=torch.int32, device=DEVICE), r"one per output tile \(4\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            skinny_linear(x, w, None, config, counters=counters)


BALANCED_CASES = [  # (m, n, k, block_m, block_n, block_k, programs, dtype)
    (5, 200, 300, 16, 32, 64, 7, torch.bfloat16),  # 7 tiles x 5 K steps over 7 programs
    (17, 96, 160, 32, 32, 32, 13, torch.float32),  # runs of 1-2 K steps: 3 parts a tile
    (64, 256, 512, 64, 64, 128, 3, torch.bfloat16),
    (3, 100, 64, 16, 16, 32, 40, torch.float16),  # more programs than K steps (14)
    (130, 48, 96, 64, 16, 32, 5, torch.float32),  # three M tiles
]


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("case", BALANCED_CASES, ids=str)
def test_programs_sharing_the_tiles_compute_the_linear(case: tuple, tma: bool) -> None:
    """``config.programs``: a fixed number of programs each streaming an equal run of
    the tiles' K steps; a tile several share is summed by the last, the counters left at
    zero; the same bits every call."""
    m, n, k, block_m, block_n, block_k, programs, dtype = case
    x, w, b = make_inputs(m, n, k, dtype, seed=programs)
    config = SkinnyConfig(block_m, block_n, block_k, 1, 4, 3, tma=tma, programs=programs)
    counters = torch.zeros(tiles(m, n, config) + 2, dtype=torch.int32, device=DEVICE)
    for bias in (None, b):
        out = skinny_linear(x, w, bias, config, counters=counters)
        assert not counters.any()
        assert_close("programs", out, F.linear(x, w, bias), dtype)
        assert torch.equal(out, skinny_linear(x, w, bias, config, counters=counters))
    # the unbalanced launch of the same tiles: the same sums but for the shared tiles'
    # order of adding, so equal within rounding
    assert_close("programs", out, skinny_linear(x, w, b, dataclasses.replace(
        config, programs=0)), dtype)  # fmt: skip


def _parts_by_walk(units: int, programs: int, k_steps: int) -> int:
    """The most programs sharing one tile, by listing each program's run."""
    owners: dict[int, set[int]] = {}
    for p in range(programs):
        for unit in range(p * units // programs, (p + 1) * units // programs):
            owners.setdefault(unit // k_steps, set()).add(p)
    return max(len(o) for o in owners.values())


@given(tiles_=st.integers(1, 300), k_steps=st.integers(1, 40), programs=st.integers(1, 200))
@settings(max_examples=150, deadline=None)
def test_stream_parts_bounds_the_programs_a_tile_has(tiles_: int, k_steps: int,
                                                     programs: int) -> None:  # fmt: skip
    units = tiles_ * k_steps
    programs = min(programs, units)  # as the launch caps them
    bound = stream_parts(units, programs, k_steps)
    walked = _parts_by_walk(units, programs, k_steps)
    assert walked <= bound <= min(k_steps, programs)
    if units % programs == 0 and (units // programs) % k_steps == 0:
        assert walked == 1  # runs of whole tiles share none


def test_programs_need_counters_and_no_epilogue_and_split_k_one() -> None:
    x, w, b = make_inputs(4, 64, 64, torch.bfloat16)
    config = SkinnyConfig(16, 16, 16, 1, programs=5)
    counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="needs counters"):
        skinny_linear(x, w, b, config)
    with pytest.raises(ValueError, match="no conv or activation"):
        skinny_linear(x, w, b, config, counters=counters, act=ActEpilogue())
    with pytest.raises(ValueError, match="split_k 1"):
        SkinnyConfig(16, 16, 16, 2, programs=5)
    for bad in (-1, 1.5, 1 << 17):
        with pytest.raises(ValueError, match="programs"):
            SkinnyConfig(programs=bad)  # type: ignore[arg-type]
    assert SkinnyConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("m", "n", "k", "balanced"), [
    (64, 8512, 2048, True),  # 133 tiles on 132 SMs: a second wave of one tile
    (64, 18560, 4096, True),  # 290 tiles: 2.2 waves
    (64, 8448, 2048, False),  # 132 tiles: one whole wave
    (64, 16896, 2048, False),  # 264: two
    (64, 2048, 4096, False),  # 32 tiles, K split in 4
    (64, 4096, 1024, False),  # 64 tiles, 8 K steps: too few to split, one wave
    (1, 8512, 2048, True),
])  # fmt: skip
def test_balanced_config_takes_the_tiles_that_overrun_a_wave(
    m: int, n: int, k: int, balanced: bool
) -> None:
    config = balanced_config(m, n, k, 132)
    assert (config is not None) == balanced
    if config is not None:
        base = decode_config(m, n, k, 132)
        assert config.programs == 132 and config.split_k == 1
        assert dataclasses.replace(config, programs=0, num_stages=base.num_stages) == base
        assert config.pipeline_bytes(2) <= 160 << 10 and config.num_stages >= 5
    assert balanced_config(m, n, k, 1) is None  # one SM: every tile a whole wave


CONV_CASES = [  # (m, n, k, split, start, channels, columns, width, state dtype, bias)
    (5, 96, 64, 1, 20, 40, 3, 4, torch.bfloat16, True),
    (9, 80, 128, 4, 0, 80, 4, 4, torch.float32, False),
    (3, 50, 64, 2, 17, 33, 2, 3, torch.float32, True),
]


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_epilogue_is_the_conv_step_of_those_columns(case: tuple, tma: bool) -> None:
    """The linear then `conv1d_update` on columns [start, start + channels): the same
    outputs (fp32 accumulation in another order: within bf16 rounding) and conv states,
    rows with a negative slot (padding) untouched."""
    m, n, k, split, start, channels, columns, width, state_dtype, with_bias = case
    x, w, b = make_inputs(m, n, k, torch.bfloat16, seed=n)
    gen = torch.Generator().manual_seed(m)
    pool = torch.randn(m + 4, channels, columns + 2, generator=gen).to(DEVICE, state_dtype)
    state = pool[:, :, 1:-1]  # a strided view, as a pool's slice is
    cw = torch.randn(channels, width, generator=gen).to(DEVICE, torch.bfloat16)
    cb = torch.randn(channels, generator=gen).to(DEVICE, torch.bfloat16) if with_bias else None
    slots = torch.randperm(m + 4, generator=gen)[:m].to(DEVICE)
    slots[m // 2] = -1
    expected_state, before = state.clone(), pool.clone()
    expected = F.linear(x, w, b)
    mid = expected[:, start:start + channels].contiguous()
    expected[:, start:start + channels] = conv1d_update(expected_state, slots, mid, cw, cb)
    expected[m // 2] = F.linear(x, w, b)[m // 2]  # a padding row keeps the linear's values
    config = SkinnyConfig(16, 16, 32, split, 4, 2, tma=tma)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    out = skinny_linear(x, w, b, config, counters=counters,
                        conv=ConvEpilogue(state, slots, cw, cb, start))  # fmt: skip
    assert_close("conv epilogue", out, expected, torch.bfloat16)
    # the newest column is the linear's output: as close as two bf16 linears are
    assert_close("conv state", state.float(), expected_state.float(), torch.bfloat16)
    assert torch.equal(pool[:, :, 0], before[:, :, 0]) and not counters.any()
    assert torch.equal(pool[:, :, -1], before[:, :, -1])  # beyond the view: untouched


def test_conv_epilogue_rejects_bad_geometry() -> None:
    x, w, _ = make_inputs(4, 64, 64, torch.bfloat16)
    state = torch.zeros(6, 16, 3, device=DEVICE)
    cw = torch.zeros(16, 4, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    config = SkinnyConfig(16, 16, 16, 2)
    for conv, match, counters in [
        (ConvEpilogue(state, slots, cw, None, 50), r"must lie in the output's 64", True),
        (ConvEpilogue(state, slots[:3], cw, None, 0), "slot_idx must have shape", True),
        (ConvEpilogue(state, slots.float(), cw, None, 0), "slot_idx must be one of", True),
        (ConvEpilogue(state, slots, cw[:8], None, 0), "conv_state must have shape", True),
        (ConvEpilogue(state, slots, cw, None, 0), "needs counters", False),
    ]:
        cnt = torch.zeros(16, dtype=torch.int32, device=DEVICE) if counters else None
        with pytest.raises(ValueError, match=match):
            skinny_linear(x, w, None, config, counters=cnt, conv=conv)


ACT_CASES = [  # (m, n, k, gated, with_bias): N and K off the block multiples
    (5, 40, 96, True, True),
    (16, 48, 64, True, False),
    (3, 50, 80, False, True),
]


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("case", ACT_CASES, ids=str)
def test_act_epilogue_has_the_bits_of_the_linears_then_the_activation(
    case: tuple, tma: bool
) -> None:
    """``silu(x @ gate.T + b) * (x @ up.T + ub)`` with gate and up the two halves of one
    stacked weight (Granite's input_linear), or ``relu(x @ w.T + b)²``: the bits of the
    same GEMM(s) stored, then the activation kernel."""
    m, n, k, gated, with_bias = case
    x, w, b = make_inputs(m, 2 * n, k, torch.bfloat16, seed=n)
    gate, up = w[:n], w[n:]
    bias, up_bias = (b[:n], b[n:]) if with_bias else (None, None)
    config = SkinnyConfig(max(16, 1 << (m - 1).bit_length()), 16, 32, 1, 4, 2, tma=tma)
    if gated:
        act = ActEpilogue(up, up_bias)
        expected = silu_mul(skinny_linear(x, gate, bias, config),
                            skinny_linear(x, up, up_bias, config))  # fmt: skip
        reference = F.silu(F.linear(x, gate, bias)) * F.linear(x, up, up_bias)
    else:
        act = ActEpilogue()
        expected = relu_squared(skinny_linear(x, gate, bias, config))
        reference = F.relu(F.linear(x, gate, bias)) ** 2
    out = skinny_linear(x, gate, bias, config, act=act, pdl=tma and HOPPER, prefetch_bytes=256)
    assert out.shape == (m, n)
    assert torch.equal(out, expected)
    assert_close("act epilogue", out, reference, torch.bfloat16)


def test_act_epilogue_rejects_what_it_cannot_do() -> None:
    x, w, b = make_inputs(4, 64, 64, torch.bfloat16)
    state = torch.zeros(6, 16, 3, device=DEVICE)
    conv = ConvEpilogue(state, torch.arange(4, device=DEVICE), torch.zeros(16, 4, device=DEVICE),
                        None, 0)  # fmt: skip
    whole, split = SkinnyConfig(16, 16, 16, 1), SkinnyConfig(16, 16, 16, 2)
    for config, act, extra, match in [
        (split, ActEpilogue(w), {}, "unsplit K"),
        (whole, ActEpilogue(w, None), {"conv": conv}, "cannot share a call"),
        (whole, ActEpilogue(w[:32]), {}, "act up must have shape"),
        (whole, ActEpilogue(w.float()), {}, "x's dtype"),
        (whole, ActEpilogue(w, b[:8]), {}, "act up_bias must have shape"),
        (whole, ActEpilogue(None, b), {}, "up_bias without up"),
    ]:
        with pytest.raises(ValueError, match=match):
            skinny_linear(x, w, None, config, act=act, **extra)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K >= 1"):
        skinny_linear(x[:, :0], w[:, :0], None, whole, act=ActEpilogue())
    # one K block: a split config cuts nothing, so the epilogue runs
    out = skinny_linear(x[:, :16], w[:, :16], None, split, act=ActEpilogue())
    assert torch.equal(out, relu_squared(skinny_linear(x[:, :16], w[:, :16], None, split)))


@pytest.mark.parametrize("bad", [-16, 1 << 21, 1.5])
def test_rejects_a_bad_prefetch(bad: object) -> None:
    x, w, _ = make_inputs(4, 8, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        skinny_linear(x, w, prefetch_bytes=bad)  # type: ignore[arg-type]


HOPPER = DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not HOPPER, reason="TMA and dependent launches need a Hopper GPU")
@pytest.mark.parametrize(("m", "n", "k"), [(64, 2048, 4096), (64, 333, 2048), (5, 1000, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tma_matches_the_pointer_kernel(m: int, n: int, k: int, with_bias: bool) -> None:
    x, w, b = make_inputs(m, n, k, torch.bfloat16, seed=m + n)
    bias = b if with_bias else None
    config = decode_config(m, n, k, num_sms(DEVICE))
    assert tma_fits(x, w, config)
    tma = skinny_linear(x, w, bias, config)
    pointers = skinny_linear(x, w, bias, dataclasses.replace(config, tma=False))
    assert_close("tma", tma, pointers, torch.bfloat16)
    assert_close("tma", tma, F.linear(x, w, bias), torch.bfloat16)
    assert not tma_fits(x[:, 1:], w[:, 1:], config)  # rows off 16-byte boundaries


@pytest.mark.skipif(not HOPPER, reason="TMA and dependent launches need a Hopper GPU")
@pytest.mark.parametrize("tma", [False, True])
def test_dependent_launch_chain_in_a_cuda_graph(tma: bool) -> None:
    """Norm -> GEMM -> norm -> GEMM ..., every kernel a dependent launch that asks L2 for
    its weights before it waits: each GEMM reads the norm written just before it."""
    from avmp.kernels.triton.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(3)
    ws = [(torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
          for n, k in ((2048, 1024), (1024, 2048), (3000, 1024))]  # fmt: skip
    x0 = torch.randn(64, 1024, generator=gen).to(DEVICE, torch.bfloat16)
    nw = torch.ones(1024, device=DEVICE, dtype=torch.bfloat16)

    counters = torch.zeros(1024, dtype=torch.int32, device=DEVICE)

    def chain(pdl: bool) -> torch.Tensor:
        h = x0
        for w in ws:
            if h.shape[1] == 1024:
                h = rms_norm(h, nw, 1e-5, pdl=pdl)
            config = decode_config(64, w.shape[0], h.shape[1], num_sms(DEVICE))
            config = dataclasses.replace(config, tma=tma)
            h = skinny_linear(h, w, None, config, pdl=pdl, prefetch_bytes=512 if pdl else 0,
                              counters=counters if pdl else None)  # fmt: skip
        return h

    expected = chain(False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(True)
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
        assert not counters.any()
