"""What `benchmarks.skinny_gemm` runs on the GPU (or, with ``--quick``, under Triton's
interpreter): the candidate configs, their timing, each cell's sweep, and `run`, which
saves the result after every cell. It imports Triton; `benchmarks.skinny_gemm` imports it
only to measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from avmp.kernels.triton.skinny_linear import (
    SkinnyConfig,
    default_block_m,
    default_config,
    default_split_k,
    num_sms,
    skinny_linear,
)
from benchmarks.common import (
    Timer,
    copy_bytes_per_s,
    rel_error,
    wall_timer,
    warm_up_gpu,
    write_result,
)
from benchmarks.skinny_gemm import (
    BATCHES,
    Linear,
    model_linears,
    print_header,
    step_summary,
    table_row,
    unique_shapes,
)

DTYPE = torch.bfloat16
REL_TOLERANCE = 2e-2  # bf16 outputs: one rounding of each is ~4e-3 relative
NUM_TOP_TILES = 3  # tiles whose every split is timed
SWEEP_WARMUP_MS, SWEEP_REP_MS = 2, 10
FINAL_WARMUP_MS, FINAL_REP_MS = 10, 100
COPY_BYTES = 1 << 30


@dataclass(frozen=True)
class Grid:
    """The values each config field is swept over (``block_m`` is the batch's own)."""

    block_n: tuple[int, ...]
    block_k: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]
    split_k: tuple[int, ...]


FULL_GRID = Grid(block_n=(16, 32, 64, 128), block_k=(64, 128, 256), num_warps=(4, 8),
                 num_stages=(3, 4, 5), split_k=(1, 2, 4, 8))
# --quick: the interpreter ignores warps and stages; two tiles and two splits still
# take every branch of the sweep.
QUICK_GRID = Grid(block_n=(16, 32), block_k=(32,), num_warps=(4,), num_stages=(2,),
                  split_k=(1, 2))
QUICK_BATCHES = (1, 5)


# --quick: a two-layer stand-in model, N and K off the block multiples.
QUICK_LINEARS = [Linear("tiny", "up", 40, 96, 2), Linear("tiny", "down", 24, 40, 1)]


# -- candidate configs -------------------------------------------------------------------


def is_candidate(block_m: int, block_n: int, num_warps: int) -> bool:
    """Tiles worth timing: 8 warps only for outputs of 64 x 64 and up (smaller ones idle
    them); 4 warps only up to 128 x 128 (beyond, the fp32 tile spills registers on
    sm_90); block_m at most 4 x block_n (each program re-reads the whole activation
    tile, which would then outweigh its weight rows)."""
    tile = block_m * block_n
    if (num_warps >= 8 and tile < 64 * 64) or (num_warps <= 4 and tile > 128 * 128):
        return False
    return block_m <= 4 * block_n


def candidate_tiles(m: int, n: int, k: int, grid: Grid, sms: int, smem_bytes: int | None
                    ) -> list[SkinnyConfig]:
    """The grid's tiles for this batch (block_m its own), each at its default split,
    leaving out those whose pipeline does not fit the GPU's shared memory."""
    block_m = default_block_m(m)
    tiles = []
    for block_n, block_k, warps, stages in itertools.product(
            grid.block_n, grid.block_k, grid.num_warps, grid.num_stages):
        if not is_candidate(block_m, block_n, warps):
            continue
        split = default_split_k(triton.cdiv(n, block_n) * triton.cdiv(m, block_m),
                                triton.cdiv(k, block_k), sms)
        config = SkinnyConfig(block_m, block_n, block_k, split, warps, stages)
        if smem_bytes is None or config.pipeline_bytes(DTYPE.itemsize) <= smem_bytes:
            tiles.append(config)
    return tiles


def split_variants(tile: SkinnyConfig, k: int, grid: Grid) -> list[SkinnyConfig]:
    """``tile`` at every split of the grid that leaves each part some K."""
    k_blocks = triton.cdiv(k, tile.block_k)
    return [dataclasses.replace(tile, split_k=s) for s in grid.split_k if s <= k_blocks]


# -- timing ------------------------------------------------------------------------------


def cuda_timer(warmup_ms: float, rep_ms: float, graphs: bool) -> Timer:
    """Median ms of do_bench (L2 flushed before each call), of ``fn`` or of a CUDA graph
    replaying it."""
    def timer(fn: Callable[[], object]) -> float:
        run = captured(fn) if graphs else fn
        return float(do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return timer


def captured(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (its allocations in the graph's pool)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# -- one cell ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every cell shares: device, grid, timers and limits."""

    device: torch.device
    grid: Grid
    sweep_timer: Timer
    final_timer: Timer
    sms: int
    smem_bytes: int | None


def try_config(bench: Bench, x: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor,
               config: SkinnyConfig) -> dict[str, Any]:
    """Check one config against F.linear, then time it; a failure becomes its record."""
    record: dict[str, Any] = {"config": config.to_dict()}
    try:
        err = rel_error(skinny_linear(x, weight, config=config), ref)
        if not err <= REL_TOLERANCE:
            return record | {"error": f"wrong result: relative error {err:.2e}"}
        ms = bench.sweep_timer(lambda: skinny_linear(x, weight, config=config))
    except Exception as exc:  # compile or launch failure (e.g. out of shared memory)
        first_line = (str(exc).splitlines() or [""])[0]
        return record | {"error": f"{type(exc).__name__}: {first_line[:200]}"}
    return record | {"ms": ms, "rel_error": err}


def sweep(bench: Bench, x: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor,
          default: SkinnyConfig) -> list[dict[str, Any]]:
    """Every candidate tile at its default split, then the fastest tiles at each split."""
    (m, k), n = x.shape, weight.shape[0]
    trials = {default: try_config(bench, x, weight, ref, default)}
    for tile in candidate_tiles(m, n, k, bench.grid, bench.sms, bench.smem_bytes):
        if tile not in trials:
            trials[tile] = try_config(bench, x, weight, ref, tile)
    timed = sorted((t for t in trials.values() if "ms" in t), key=lambda t: t["ms"])
    for best in timed[:NUM_TOP_TILES]:
        for config in split_variants(SkinnyConfig.from_dict(best["config"]), k, bench.grid):
            if config not in trials:
                trials[config] = try_config(bench, x, weight, ref, config)
    return list(trials.values())


def bench_cell(bench: Bench, weight: torch.Tensor, m: int, layers: list[str], swept: bool,
               gen: torch.Generator) -> dict[str, Any]:
    """cuBLAS, the default config and (when ``swept``) the sweep at one (shape, M)."""
    n, k = weight.shape
    x = torch.randn(m, k, generator=gen, device=bench.device).to(DTYPE)
    ref = F.linear(x, weight)
    default = default_config(m, n, k, bench.sms, DTYPE.itemsize)
    if swept:
        trials = sweep(bench, x, weight, ref, default)
    else:
        trials = [try_config(bench, x, weight, ref, default)]
    timed = [t for t in trials if "ms" in t]
    cell: dict[str, Any] = {
        "n": n, "k": k, "m": m, "layers": layers, "weight_bytes": weight.numel() * DTYPE.itemsize,
        "swept": swept, "num_configs": len(trials), "num_failed": len(trials) - len(timed),
        "default": default.to_dict(), "trials": trials,
    }
    time_final(bench, cell, "cublas", lambda: F.linear(x, weight))
    if any(t["config"] == default.to_dict() for t in timed):
        time_final(bench, cell, "default", lambda: skinny_linear(x, weight, config=default))
    if timed:
        best = min(timed, key=lambda t: t["ms"])
        config = SkinnyConfig.from_dict(best["config"])
        cell |= {"best": best["config"], "best_rel_error": best["rel_error"]}
        time_final(bench, cell, "best", lambda: skinny_linear(x, weight, config=config))
    return cell | throughput(cell)


def time_final(bench: Bench, cell: dict[str, Any], key: str, fn: Callable[[], object]) -> None:
    """``cell[key + "_ms"]`` from the final timer, or, should the CUDA graph capture
    fail, from the sweep's eager timer with the reason noted."""
    try:
        cell[f"{key}_ms"] = bench.final_timer(fn)
    except Exception as exc:
        cell[f"{key}_ms"] = bench.sweep_timer(fn)
        cell[f"{key}_timing"] = f"eager, capture failed: {type(exc).__name__}"


def throughput(cell: dict[str, Any]) -> dict[str, float]:
    """Weight TB/s of cuBLAS, the default and the best config; cuBLAS time / best time."""
    out = {f"{key}_tbps": cell["weight_bytes"] / cell[f"{key}_ms"] / 1e9
           for key in ("cublas", "default", "best") if f"{key}_ms" in cell}
    if "best_ms" in cell:
        out["speedup"] = cell["cublas_ms"] / cell["best_ms"]
    return out


# -- the run -----------------------------------------------------------------------------


def make_bench(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if device.type != "cuda":
        # CPU (--quick under the interpreter): the median of three calls after one
        return Bench(device, grid, wall_timer(1, 3), wall_timer(1, 3), num_sms(device), None)
    props = triton.runtime.driver.active.utils.get_device_properties(
        device.index if device.index is not None else torch.cuda.current_device())
    return Bench(device, grid, cuda_timer(SWEEP_WARMUP_MS, SWEEP_REP_MS, graphs=False),
                 cuda_timer(FINAL_WARMUP_MS, FINAL_REP_MS, graphs=True), num_sms(device),
                 int(props["max_shared_mem"]))


def header(args: argparse.Namespace, bench: Bench, linears: list[Linear]) -> dict[str, Any]:
    cuda = bench.device.type == "cuda"
    copy_bytes = COPY_BYTES if cuda else 1 << 20
    return {
        "device": torch.cuda.get_device_name(bench.device) if cuda
                   else f"CPU {platform.machine()} (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(DTYPE),
        "quick": args.quick, "num_sms": bench.sms, "max_shared_mem": bench.smem_bytes,
        "copy_tbps": copy_bytes_per_s(bench.device, copy_bytes, bench.sweep_timer) / 1e12,
        "timing": ("do_bench median, L2 flushed; sweep eager, rep "
                   f"{SWEEP_REP_MS} ms; reported CUDA graph replay, rep {FINAL_REP_MS} ms"
                   if cuda else "CPU interpreter, median wall time of 3 calls"),
        "grid": dataclasses.asdict(bench.grid),
        "linears": [dataclasses.asdict(lin) for lin in linears],
        "cells": [],
    }


def benchmarked(args: argparse.Namespace) -> tuple[list[Linear], tuple[int, ...]]:
    """The weight shapes and batch sizes this run times."""
    if args.quick:
        return QUICK_LINEARS, tuple(args.batches or QUICK_BATCHES)
    return model_linears(args.models), tuple(args.batches or BATCHES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    bench = make_bench(args)
    if bench.device.type == "cuda":
        warm_up_gpu()
    linears, batches = benchmarked(args)
    result = header(args, bench, linears)
    gen = torch.Generator(device=bench.device).manual_seed(0)
    start = time.perf_counter()
    print_header(result)
    for (n, k), layers in unique_shapes(linears).items():
        weight = (torch.randn(n, k, generator=gen, device=bench.device) * k**-0.5).to(DTYPE)
        for m in batches:
            swept = time.perf_counter() - start < args.budget_s
            cell = bench_cell(bench, weight, m, layers, swept, gen)
            result["cells"].append(cell)
            print(table_row(cell), flush=True)
            result["table"] = best_table(result["cells"])
            write_result(args.out, result)
        del weight
    result["elapsed_s"] = time.perf_counter() - start
    write_result(args.out, result)
    print("\n".join(["", *step_summary(result)]))
    print(f"\n{len(result['cells'])} cells in {result['elapsed_s']:.0f} s")
    return result


def best_table(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """``"NxK" -> "M" -> best config``: the lookup the engine loads (an M between two
    measured ones takes the next larger one's entry)."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for cell in cells:
        if "best" in cell:
            table.setdefault(f"{cell['n']}x{cell['k']}", {})[str(cell["m"])] = cell["best"]
    return table
