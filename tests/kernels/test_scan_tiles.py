"""The chunked Mamba2 scan's launch configuration (`ScanTiles`): its validation, the tuned
table (parsing, GPU-name matching, fallback to the defaults), and the scan's outputs under
non-default tiles against the float64 sequential reference (tolerances as in
test_triton_mamba2_chunk_scan: fp32 1e-4, bf16 2e-2).

The tiles below split every dimension of a tiny shape differently from the defaults (16-wide
tiles that cut chunks, head_dim and d_state into several blocks; tiles equal to the shape;
caps far above it that shrink to it), with other warps and stages, so each kernel's block
loops and masks run in another arrangement than the default one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _triton_cases import POISON, assert_close
from test_triton_mamba2_varlen_scan import make_case, reference_scan

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.mamba2_chunk_scan import (  # noqa: E402
    SCAN_KERNELS,
    CbTiles,
    ChunkScanTiles,
    ChunkStateTiles,
    DtCumsumTiles,
    ScanTiles,
    StatePassingTiles,
    TunedKey,
    _device_tiles,
    chunk_scan_launches,
    gpu_key,
    mamba2_chunk_scan,
    packaged_tuned_table,
    parse_tuned_table,
    tuned_tiles,
)

SMALL = ScanTiles(
    DtCumsumTiles(num_warps=1, num_stages=1, block_heads=1),
    CbTiles(num_warps=2, num_stages=1, block_tokens=16, block_state=16),
    ChunkStateTiles(num_warps=2, num_stages=2, block_p=16, block_state=16, block_tokens=16),
    StatePassingTiles(num_warps=2, num_stages=1, block_flat=64),
    ChunkScanTiles(num_warps=2, num_stages=1, block_tokens=16, block_p=16, block_state=16,
                   block_j=16),
)
MIXED = ScanTiles(
    DtCumsumTiles(num_warps=8, block_heads=2),
    CbTiles(num_warps=8, num_stages=2, block_tokens=32, block_state=16),
    ChunkStateTiles(num_warps=8, num_stages=1, block_p=32, block_state=16, block_tokens=32),
    StatePassingTiles(num_warps=8, num_stages=2, block_flat=256, prefetch=1),
    ChunkScanTiles(num_warps=8, num_stages=2, block_tokens=16, block_p=32, block_state=32,
                   block_j=32),  # source blocks wider than the row blocks
)
LARGE = ScanTiles(
    DtCumsumTiles(block_heads=64),
    CbTiles(num_stages=4, block_tokens=128, block_state=128),
    ChunkStateTiles(block_p=128, block_state=256, block_tokens=128),
    StatePassingTiles(num_warps=16, block_flat=8192),
    ChunkScanTiles(num_warps=16, block_tokens=256, block_p=128, block_state=128, block_j=16),
)


# -- validation ----------------------------------------------------------------------------


def test_defaults_are_the_untuned_launches() -> None:
    tiles = ScanTiles()
    assert SCAN_KERNELS == ("dt_cumsum", "cb", "chunk_state", "state_passing", "chunk_scan")
    assert tiles.chunk_scan == ChunkScanTiles(num_warps=4, num_stages=3, block_tokens=64,
                                              block_p=64, block_state=64, block_j=64)
    assert tiles.dt_cumsum.block_heads == 8 and tiles.state_passing.block_flat == 1024
    assert tiles.state_passing.label() == "flat1024 ahead2 w4 s3"
    assert {getattr(tiles, k).num_warps for k in SCAN_KERNELS} == {4}
    assert tiles.chunk_scan.label() == "tokens64 p64 state64 j64 w4 s3"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: CbTiles(block_tokens=48),
         r"CbTiles.block_tokens must be a power of two in \[16, 256\], got 48"),
        (lambda: CbTiles(block_state=8), r"block_state must be a power of two in \[16, 256\]"),
        (lambda: ChunkScanTiles(block_p=512), "block_p must be a power of two"),
        (lambda: ChunkStateTiles(block_tokens=True), "block_tokens must be a power of two"),
        (lambda: DtCumsumTiles(block_heads=128), r"block_heads must be a power of two in \[1,"),
        (lambda: StatePassingTiles(block_flat=16), r"block_flat must be a power of two in \[32,"),
        (lambda: StatePassingTiles(num_warps=3), "num_warps must be one of"),
        (lambda: StatePassingTiles(prefetch=3),
         r"StatePassingTiles.prefetch must be one of \(1, 2\), got 3"),
        (lambda: StatePassingTiles(prefetch=True), "prefetch must be one of"),
        (lambda: CbTiles(num_warps=32), "num_warps must be one of"),
        (lambda: ChunkScanTiles(num_stages=0), r"num_stages must be an int in \[1, 8\]"),
        (lambda: ChunkScanTiles(num_stages=2.0), "num_stages must be an int"),
    ],
)
def test_kernel_tiles_reject_what_the_kernels_cannot_take(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_scan_tiles_hold_each_kernel_in_its_own_type() -> None:
    with pytest.raises(TypeError, match="ScanTiles.cb must be a CbTiles, got ChunkScanTiles"):
        ScanTiles(cb=ChunkScanTiles())  # type: ignore[arg-type]
    tiles = ScanTiles().with_kernel("cb", CbTiles(block_tokens=32))
    assert tiles.cb.block_tokens == 32 and tiles.chunk_scan == ChunkScanTiles()
    with pytest.raises(ValueError, match="unknown scan kernel 'scan'"):
        ScanTiles().with_kernel("scan", CbTiles())


def test_dict_round_trip_and_partial_dicts() -> None:
    for tiles in (ScanTiles(), SMALL, MIXED, LARGE):
        assert ScanTiles.from_dict(json.loads(json.dumps(tiles.to_dict()))) == tiles
    partial = ScanTiles.from_dict({"chunk_scan": {"block_tokens": 128, "num_warps": 8}})
    assert partial == ScanTiles().with_kernel(
        "chunk_scan", ChunkScanTiles(block_tokens=128, num_warps=8))
    for bad, message in (({"scan": {}}, "unknown scan kernels"),
                         ({"cb": {"block": 32}}, "tiles of cb: .*unexpected keyword"),
                         ({"cb": [32]}, "tiles of cb must be a mapping"),
                         ({"cb": {"block_tokens": 24}}, "block_tokens must be a power"),
                         ([1], "must be a mapping")):
        with pytest.raises(ValueError, match=message):
            ScanTiles.from_dict(bad)  # type: ignore[arg-type]


# -- the tuned table -------------------------------------------------------------------------


def entry(gpu: str = "NVIDIA H200", chunk: int = 256, dtype: str = "bfloat16",
          tiles: object = None) -> dict[str, object]:
    return {"gpu": gpu, "command": "python3 -m benchmarks.scan_tune --out x.json.gz",
            "chunk_size": chunk, "head_dim": 64, "d_state": 128, "dtype": dtype,
            "tiles": MIXED.to_dict() if tiles is None else tiles, "speedup": 1.2}


def test_lookup_matches_the_gpu_name_shape_and_dtype() -> None:
    table = parse_tuned_table({"entries": [entry(), entry("NVIDIA H100 80GB HBM3", chunk=128,
                                                          tiles=SMALL.to_dict())]}, "t.json")
    assert set(table) == {TunedKey("nvidia h200", 256, 64, 128, "bfloat16"),
                          TunedKey("nvidia h100 80gb hbm3", 128, 64, 128, "bfloat16")}
    assert tuned_tiles(256, 64, 128, torch.bfloat16, "NVIDIA H200", table) == MIXED
    assert tuned_tiles(256, 64, 128, "bfloat16", " nvidia  H200 ", table) == MIXED
    assert tuned_tiles(128, 64, 128, torch.bfloat16, "NVIDIA H100 80GB HBM3", table) == SMALL
    # another GPU, shape or dtype, or no GPU at all: the defaults
    for args in ((256, 64, 128, torch.bfloat16, "NVIDIA H200 NVL"),
                 (256, 64, 128, torch.bfloat16, "NVIDIA H100 80GB HBM3"),
                 (128, 64, 128, torch.bfloat16, "NVIDIA H200"),
                 (256, 64, 64, torch.bfloat16, "NVIDIA H200"),
                 (256, 64, 128, torch.float16, "NVIDIA H200"),
                 (256, 64, 128, torch.bfloat16, None)):
        assert tuned_tiles(*args, table=table) == ScanTiles()
    assert gpu_key("NVIDIA  H200\n") == "nvidia h200"


@pytest.mark.parametrize(
    "data,message",
    [
        ([], "an object with an 'entries' list"),
        ({"entries": {}}, "an object with an 'entries' list"),
        ({"entries": [1]}, "entry 0 is not an object"),
        ({"entries": [entry(gpu="")]}, "entry 0: 'gpu' must be a non-empty string"),
        ({"entries": [entry() | {"command": None}]}, "'command' must be a non-empty string"),
        ({"entries": [entry(chunk=0)]}, "'chunk_size' must be a positive int"),
        ({"entries": [entry() | {"head_dim": "64"}]}, "'head_dim' must be a positive int"),
        ({"entries": [entry(tiles={"cb": {"num_warps": 3}})]}, "entry 0: .*num_warps"),
        ({"entries": [{k: v for k, v in entry().items() if k != "tiles"}]},
         "entry 0: tiles must be a mapping"),
        ({"entries": [entry(), entry(gpu="nvidia h200")]}, "entry 1: a second entry"),
    ],
)
def test_malformed_tables_name_the_file_and_entry(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"t.json: .*{message}|t.json: {message}"):
        parse_tuned_table(data, "t.json")


def test_the_packaged_table_loads_and_off_the_gpu_the_scan_takes_the_defaults() -> None:
    table = packaged_tuned_table()
    assert packaged_tuned_table() is table  # read once
    for key, tiles in table.items():
        assert isinstance(tiles, ScanTiles) and key.gpu == gpu_key(key.gpu)
    assert _device_tiles(torch.device("cpu"), 256, 64, 128, torch.bfloat16) == ScanTiles()


# -- outputs under other tiles --------------------------------------------------------------

LENS = [5, 32, 47, 70]  # shorter than a chunk, exactly one, one and a half, two and more
CHUNK, HEADS, HEAD_DIM, D_STATE, GROUPS = 32, 4, 32, 32, 2


def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def run_scan(case: dict[str, torch.Tensor], dtype: torch.dtype, tiles: ScanTiles | None,
             fresh: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    state = case["state"].clone()
    out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
    flags = torch.tensor([not f for f in fresh], device=DEVICE)
    mamba2_chunk_scan(state, case["slot_idx"], offsets(LENS), case["x"], case["dt"], case["A"],
                      case["B"], case["C"], CHUNK, D=case["D"], dt_bias=case["dt_bias"],
                      z=case["z"], has_initial_state=flags, dt_limit=(0.0, math.inf), out=out,
                      tiles=tiles)
    return out, state[case["slot_idx"].long()]


@pytest.mark.parametrize("tiles", [SMALL, MIXED, LARGE], ids=["small", "mixed", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_other_tiles_give_the_reference_result(tiles: ScanTiles, dtype: torch.dtype) -> None:
    case = make_case(11, torch.float32, dtype, LENS, HEADS, HEAD_DIM, D_STATE, GROUPS, 6)
    fresh = [True, False, False, True]
    y_ref, h_ref = reference_scan(case, LENS, fresh, "D,dt_bias,z", (0.0, math.inf))
    y, h = run_scan(case, dtype, tiles, fresh)
    assert_close("y", y, y_ref, dtype)
    assert_close("final state", h, h_ref, dtype)
    y_default, h_default = run_scan(case, dtype, None, fresh)  # the defaults, same inputs
    assert_close("y against the default tiles", y, y_default, dtype)
    assert_close("state against the default tiles", h, h_default, dtype)


def test_launches_in_order_are_the_scan() -> None:
    case = make_case(5, torch.float32, torch.float32, LENS, HEADS, HEAD_DIM, D_STATE, GROUPS, 6)
    whole, state_whole = run_scan(case, torch.float32, MIXED, [False] * 4)
    state = case["state"].clone()
    launches, out = chunk_scan_launches(
        state, case["slot_idx"], offsets(LENS), case["x"], case["dt"], case["A"], case["B"],
        case["C"], CHUNK, D=case["D"], dt_bias=case["dt_bias"], z=case["z"], tiles=MIXED)
    assert tuple(launches) == SCAN_KERNELS
    for launch in launches.values():
        launch()
    assert torch.equal(out, whole)
    assert torch.equal(state[case["slot_idx"].long()], state_whole)
    with pytest.raises(TypeError, match="tiles must be a ScanTiles, got dict"):
        chunk_scan_launches(state, case["slot_idx"], offsets(LENS), case["x"], case["dt"],
                            case["A"], case["B"], case["C"], CHUNK, tiles=MIXED.to_dict())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="the tuned table is per GPU")
def test_shipped_entries_for_this_gpu_give_the_reference_result() -> None:
    """Every tuned entry for this GPU, taken by the scan itself (``tiles=None``), on its
    shape: two prompts of a chunk and a half, one continuing, one fresh."""
    gpu = gpu_key(torch.cuda.get_device_name(DEVICE))
    entries = [key for key in packaged_tuned_table() if key.gpu == gpu]
    if not entries:
        pytest.skip(f"the tuned table has no entry for {gpu}")
    for key in entries:
        dtype = getattr(torch, key.dtype)
        lens = [key.chunk_size * 3 // 2, key.chunk_size + 1]
        case = make_case(3, torch.float32, dtype, lens, 8, key.head_dim, key.d_state, 2, 4)
        assert _device_tiles(DEVICE, key.chunk_size, key.head_dim, key.d_state, dtype) == \
            packaged_tuned_table()[key]
        y_ref, h_ref = reference_scan(case, lens, [False, True], "D,dt_bias", (0.0, math.inf))
        out = torch.full(tuple(case["x"].shape), POISON, dtype=dtype, device=DEVICE)
        mamba2_chunk_scan(case["state"], case["slot_idx"], offsets(lens), case["x"],
                          case["dt"], case["A"], case["B"], case["C"], key.chunk_size,
                          D=case["D"], dt_bias=case["dt_bias"],
                          has_initial_state=torch.tensor([True, False], device=DEVICE),
                          out=out)
        assert_close(f"y {key}", out, y_ref, dtype)
        assert_close(f"state {key}", case["state"][case["slot_idx"].long()], h_ref, dtype)
