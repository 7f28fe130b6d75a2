"""Triton varlen causal conv1d against `reference.causal_conv1d` run per sequence: mixed
lengths (decodes, sequences shorter than the history), fresh and continued histories,
both column conventions, strided x and pool views, shuffled slots, padding sequences,
a long chunk among many decodes, tile tables built for padded token counts (as a CUDA
graph's bucket builds them), and the one-token case against `conv1d_update`."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import POISON, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import reference as ref  # noqa: E402
from avmp.kernels.triton.causal_conv1d_varlen import (  # noqa: E402
    BLOCK_T,
    ConvTileTable,
    causal_conv1d_varlen,
    conv_tiles,
)
from avmp.kernels.triton.conv1d_update import conv1d_update  # noqa: E402

NUM_SLOTS = 20


def make_case(
    seed: int, dtype: torch.dtype, state_dtype: torch.dtype, lens: list[int], channels: int,
    width: int, columns: int, extra_rows: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs of one step: x a column slice of a wider, token-minor buffer (no unit
    stride anywhere), the conv state a permuted view interleaved with another layer's."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lens) + extra_rows
    state, _ = strided_views((NUM_SLOTS, channels, columns), 2, state_dtype, DEVICE, gen, True)
    # Values on x's grid, so the reference's detour of the history through weight's
    # dtype is lossless and new states compare exactly.
    state.copy_(state.to(dtype).to(state_dtype))
    wide = torch.randn(channels + 5, tokens, generator=gen).to(dtype).to(DEVICE)
    return {
        "x": wide.t()[:, 2 : 2 + channels],
        "conv_state": state,
        "query_start_loc": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],
                                        dtype=torch.int32, device=DEVICE),
        "slot_idx": torch.randperm(NUM_SLOTS, generator=gen)[: len(lens)].to(DEVICE),
        "weight": (torch.randn(channels, width, generator=gen) * 0.5).to(dtype).to(DEVICE),
        "bias": torch.randn(channels, generator=gen).to(dtype).to(DEVICE),
    }


def reference_step(
    case: dict[str, torch.Tensor], has_init: list[bool], bias: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`reference.causal_conv1d` per real sequence on copies of the slots: (output rows
    of real sequences, NaN elsewhere; new state per slot)."""
    x, qsl = case["x"], case["query_start_loc"].tolist()
    out = torch.full(tuple(x.shape), POISON, dtype=x.dtype, device=DEVICE)
    states = {}
    for b, slot in enumerate(case["slot_idx"].tolist()):
        if slot < 0:
            continue
        conv = case["conv_state"][slot].clone()
        if not has_init[b]:
            conv.zero_()
        rows = slice(qsl[b], qsl[b + 1])
        out[rows] = ref.causal_conv1d(x[rows], conv, case["weight"], bias, activation)
        states[slot] = conv
    return out, states


def run_and_check(
    case: dict[str, torch.Tensor], has_init: list[bool], dtype: torch.dtype,
    use_bias: bool = True, activation: str | None = "silu", table_tokens: int | None = None,
    flag_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Run the kernel on the case and compare with `reference_step`; ``table_tokens``:
    pass a tile table built for this many token rows (None: the launch builds its own)."""
    bias = case["bias"] if use_bias else None
    tiles = None
    if table_tokens is not None:
        tiles = conv_tiles(case["query_start_loc"], case["slot_idx"], table_tokens)
    out_ref, states_ref = reference_step(case, has_init, bias, activation)
    before = case["conv_state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    flags = torch.tensor(has_init, device=DEVICE).to(flag_dtype)
    causal_conv1d_varlen(case["x"], case["conv_state"], case["query_start_loc"],
                         case["slot_idx"], flags, case["weight"], bias, activation, out=out,
                         tiles=tiles)
    written = ~torch.isnan(out_ref)
    assert torch.equal(torch.isnan(out), ~written), "rows outside real sequences were written"
    assert_close("out", out[written], out_ref[written], dtype)
    for slot, state in states_ref.items():
        # The new history is a copy of inputs: exact, whatever the dtype.
        assert torch.equal(case["conv_state"][slot], state), f"slot {slot}"
    kept = [s for s in range(NUM_SLOTS) if s not in states_ref]
    assert torch.equal(case["conv_state"][kept], before[kept]), "a slot not named changed"
    return out


@pytest.mark.parametrize(
    "dtype,state_dtype,lens,has_init,channels,width,columns,table_tokens",
    [
        # decodes, chunks shorter than the history, a chunk spanning two token tiles
        (torch.float32, torch.float32, [1, 2, 37, 1, 5], [1, 0, 1, 1, 0], 40, 4, 3, None),
        # the table built for more token rows than the step holds (a graph's bucket)
        (torch.float32, torch.float32, [1, 2, 37, 1, 5], [1, 0, 1, 1, 0], 40, 4, 3, 200),
        # transformers' layout: the oldest column kept, shifted, never read
        (torch.float32, torch.float32, [3, 1, 2, 9], [0, 1, 1, 1], 70, 4, 4, None),
        (torch.bfloat16, torch.bfloat16, [6, 1, 2], [1, 1, 0], 24, 4, 3, None),
        (torch.bfloat16, torch.float32, [2, 1, 11], [1, 1, 1], 24, 4, 4, 17),
        (torch.float16, torch.float16, [1, 4, 1], [1, 0, 1], 33, 3, 5, None),
        # fp32 inputs into a bf16 history: rounded to nearest, as torch casts
        (torch.float32, torch.bfloat16, [3, 1, 6], [1, 0, 1], 24, 4, 3, None),
    ],
)
def test_matches_reference_per_sequence(
    dtype: torch.dtype, state_dtype: torch.dtype, lens: list[int], has_init: list[int],
    channels: int, width: int, columns: int, table_tokens: int | None,
) -> None:
    case = make_case(5, dtype, state_dtype, lens, channels, width, columns, extra_rows=3)
    run_and_check(case, [bool(f) for f in has_init], dtype, table_tokens=table_tokens)


@pytest.mark.parametrize("use_bias,activation", [(False, None), (True, None), (False, "silu")])
def test_bias_and_activation_options(use_bias: bool, activation: str | None) -> None:
    case = make_case(6, torch.float32, torch.float32, [4, 1, 2], 16, 2, 1)
    run_and_check(case, [True, True, False], torch.float32, use_bias, activation,
                  flag_dtype=torch.bool)


def test_padding_sequences_are_skipped() -> None:
    """Slot -1 (graph padding): its rows stay unwritten and no slot changes for it; rows
    past query_start_loc[B] stay unwritten as well."""
    case = make_case(7, torch.float32, torch.float32, [3, 1, 4, 1], 16, 4, 3, extra_rows=2)
    case["slot_idx"][1] = -1
    case["slot_idx"][3] = -1
    out = run_and_check(case, [True, False, True, False], torch.float32,
                        flag_dtype=torch.int32)
    assert torch.isnan(out[3]).all() and torch.isnan(out[8:]).all()


def test_long_chunk_among_many_decodes() -> None:
    """A mixed step as the engine runs it: one chunk of several token tiles, one-token
    decodes (continued and fresh), sequences shorter than the history, and padding
    sequences (slot -1, with rows and without), two channel blocks, the table built for
    a padded token count."""
    lens = [1, 1, 2 * BLOCK_T + 7, 1, 2, 1, 1, 3, 1, 0, 1, 1]
    has_init = [1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0]
    case = make_case(11, torch.float32, torch.float32, lens, 70, 4, 3, extra_rows=5)
    case["slot_idx"][5] = -1
    case["slot_idx"][9] = -1
    run_and_check(case, [bool(f) for f in has_init], torch.float32,
                  table_tokens=sum(lens) + 5 + BLOCK_T)


def test_table_bound_does_not_change_results() -> None:
    """Every element is computed the same way whatever the table's length: its own, a
    padded step's, or one built on the fly."""
    outs, states = [], []
    for table_tokens in (None, 73, 300):
        case = make_case(8, torch.float32, torch.float32, [1, 70, 2], 24, 4, 4)
        tiles = None if table_tokens is None else conv_tiles(
            case["query_start_loc"], case["slot_idx"], table_tokens)
        outs.append(causal_conv1d_varlen(
            case["x"], case["conv_state"], case["query_start_loc"], case["slot_idx"],
            torch.tensor([1, 1, 0], device=DEVICE), case["weight"], case["bias"],
            tiles=tiles))
        states.append(case["conv_state"].clone())
    for out, state in zip(outs[1:], states[1:], strict=True):
        assert torch.equal(outs[0], out)
        assert torch.equal(states[0], state)


def test_conv_tiles_cut_tokens_not_sequences() -> None:
    """One entry per BLOCK_T tokens of each sequence with a slot, in token order, none
    for padding; the length follows from the token and sequence counts alone."""
    lens = [1, 2 * BLOCK_T + 1, 0, 3, BLOCK_T]
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.tensor([4, 0, 2, -1, 7])
    tiles = conv_tiles(qsl.to(DEVICE), slots.to(DEVICE), 500)
    assert tiles.block_t == BLOCK_T
    assert tiles.tile_seq.shape[0] == -(-500 // BLOCK_T) + len(lens)
    offs = qsl.tolist()
    expected = [(0, 0), (1, offs[1]), (1, offs[1] + BLOCK_T), (1, offs[1] + 2 * BLOCK_T),
                (4, offs[4])]
    seq, start = tiles.tile_seq.cpu().tolist(), tiles.tile_start.cpu().tolist()
    assert list(zip(seq, start, strict=True))[: len(expected)] == expected
    assert all(s == -1 for s in seq[len(expected):])
    # other lengths, same shapes: the same table length (a captured grid replays)
    qsl2 = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=DEVICE)
    assert conv_tiles(qsl2, slots.to(DEVICE), 500).tile_seq.shape == tiles.tile_seq.shape


def test_one_token_sequences_match_conv1d_update() -> None:
    case = make_case(9, torch.float32, torch.float32, [1, 1, 1, 1], 40, 4, 3)
    twin = case["conv_state"].clone()
    out = causal_conv1d_varlen(case["x"], case["conv_state"], case["query_start_loc"],
                               case["slot_idx"], torch.ones(4, device=DEVICE, dtype=torch.int32),
                               case["weight"], case["bias"])
    expected = conv1d_update(twin, case["slot_idx"], case["x"], case["weight"], case["bias"])
    assert_close("out", out, expected, torch.float32)
    assert torch.equal(case["conv_state"], twin)


def test_rejects_bad_inputs() -> None:
    case = make_case(1, torch.float32, torch.float32, [2, 1], 8, 4, 3)
    args = [case[k] for k in ("x", "conv_state", "query_start_loc", "slot_idx")]
    flags = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="columns"):
        causal_conv1d_varlen(args[0], args[1][:, :, :2], *args[2:], flags, case["weight"])
    with pytest.raises(ValueError, match="query_start_loc"):
        causal_conv1d_varlen(*args[:2], args[2][:2], args[3], flags, case["weight"])
    with pytest.raises(ValueError, match="has_initial_state"):
        causal_conv1d_varlen(*args, flags.float(), case["weight"])
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_varlen(*args, flags, case["weight"][:4])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_varlen(*args, flags, case["weight"], activation="gelu")
    with pytest.raises(ValueError, match="share memory"):
        causal_conv1d_varlen(*args, flags, case["weight"], out=args[0])
    table = conv_tiles(args[2], args[3], 3)
    with pytest.raises(ValueError, match="tile"):
        causal_conv1d_varlen(*args, flags, case["weight"],
                             tiles=ConvTileTable(table.tile_seq, table.tile_start, 16))
    with pytest.raises(ValueError, match="tile_start"):
        causal_conv1d_varlen(*args, flags, case["weight"],
                             tiles=table._replace(tile_start=table.tile_start[:1]))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs CUDA")
def test_runs_in_a_cuda_graph() -> None:
    """The launch captures, and a replay follows new lengths and flags written into the
    same index tensors: nothing about them reached the host at capture."""
    case = make_case(3, torch.bfloat16, torch.bfloat16, [5, 1, 30], 72, 4, 3)
    flags = torch.tensor([1, 1, 0], device=DEVICE)
    pristine = case["conv_state"].clone()
    out = torch.empty_like(case["x"])
    args = (case["x"], case["conv_state"], case["query_start_loc"], case["slot_idx"], flags,
            case["weight"], case["bias"])
    causal_conv1d_varlen(*args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        causal_conv1d_varlen(*args, out=out)
    case["query_start_loc"].copy_(torch.tensor([0, 1, 20, 36], device=DEVICE))
    flags.copy_(torch.tensor([0, 1, 1], device=DEVICE))
    case["conv_state"].copy_(pristine)
    out_ref, states_ref = reference_step(case, [False, True, True], case["bias"], "silu")
    graph.replay()
    torch.cuda.synchronize()
    assert_close("out", out, out_ref, torch.bfloat16)
    for slot, state in states_ref.items():
        assert torch.equal(case["conv_state"][slot], state)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs CUDA")
def test_graph_bucket_replays_other_mixes() -> None:
    """As the engine captures a mixed step: the tile table built inside the capture for
    the bucket's rows and sequences, then reused by a second layer; replays of a long
    chunk among decodes and of decodes alone (the rest padding, slot -1) both match."""
    bucket_lens = [8] * 8  # the capture's own lengths do not matter
    case = make_case(4, torch.bfloat16, torch.bfloat16, bucket_lens, 200, 4, 3)
    flags = torch.ones(8, dtype=torch.int32, device=DEVICE)
    slots = case["slot_idx"].clone()
    second = case["conv_state"].clone()  # another layer's pool
    outs = (torch.zeros_like(case["x"]), torch.zeros_like(case["x"]))
    qsl = case["query_start_loc"]

    def step() -> None:
        tiles = conv_tiles(qsl, case["slot_idx"], case["x"].shape[0])
        for state, out in zip((case["conv_state"], second), outs, strict=True):
            causal_conv1d_varlen(case["x"], state, qsl, case["slot_idx"], flags,
                                 case["weight"], case["bias"], out=out, tiles=tiles)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    pristine = case["conv_state"].clone()
    mixes = (  # (lengths, has_init, padding sequences)
        ([1, 57, 1, 1, 2, 0, 0, 0], [1, 0, 1, 1, 1, 0, 0, 0], [5, 6, 7]),
        ([1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 0], [7]),
    )
    for lens, has_init, padding in mixes:
        qsl.copy_(torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE))
        flags.copy_(torch.tensor(has_init, device=DEVICE))
        case["slot_idx"].copy_(slots)
        case["slot_idx"][padding] = -1
        case["conv_state"].copy_(pristine)
        second.copy_(pristine)
        for out in outs:
            out.zero_()
        out_ref, states_ref = reference_step(case, [bool(f) for f in has_init],
                                             case["bias"], "silu")
        graph.replay()
        torch.cuda.synchronize()
        written = ~torch.isnan(out_ref)
        for state, out in zip((case["conv_state"], second), outs, strict=True):
            assert_close("out", out[written], out_ref[written], torch.bfloat16)
            assert not out[~written].any(), "rows outside real sequences were written"
            for slot, expected in states_ref.items():
                assert torch.equal(state[slot], expected)
