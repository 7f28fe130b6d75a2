"""A decode row's linears with the norm or activation before them in their prologue
(`avmp.kernels.triton.prologue_linear`) against the two kernels they replace (the Triton
norm or activation, then cuBLAS), per linear of Nemotron-H-8B and Granite-4.0-H-Micro.

Per linear that the engine fuses at one row (the Mamba2 in_proj after the residual add
and norm, out_proj after the gated norm, the MLP's first linear after the add and norm,
its second after SiLU*up or relu², attention's q/k/v after the add and norm), bf16, no
bias, one row:

1. cuBLAS alone (``F.linear``: the weight-streaming floor the fusion must keep);
2. unfused: the Triton norm or activation kernel, then ``F.linear``;
3. fused with the default tile (`prologue_linear.tiles`), without and with programmatic
   dependent launch (consecutive calls overlap: the next call's first weight tile is
   read while this one finishes, as consecutive linears of a decode step do);
4. a sweep of tiles (8 or 16 weight rows, K steps of 256, 1,024 or 2,048, 4 or 8 warps),
   without PDL.

Times: medians of CUDA-graph replays of 24 calls each, the weights rotated through
copies that do not fit in L2 together (a decode step never finds its weights there).
TB/s = weight bytes / time.

    PYTHONPATH=src python3 -m benchmarks.prologue_linear --out $OUT/prologue_linear.json.gz
    python3 -m benchmarks.prologue_linear \
        --markdown benchmarks/results/prologue_linear_h100_s21.json.gz
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avmp.models.zoo import zoo_config
from benchmarks.common import graph_us, measure_or_redraw, write_result
from benchmarks.skinny_gemm import model_linears

MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
# layer name (benchmarks.skinny_gemm) -> the prologue the engine fuses into it at one row
PROLOGUES = {
    "mamba in_proj": "add_norm",
    "mamba out_proj": "gated_norm",
    "shared_mlp input_linear": "add_norm",
    "shared_mlp output_linear": "silu_mul",
    "mlp up": "add_norm",
    "mlp down": "relu_squared",
    "attention q": "add_norm",
    "attention k, v": "norm",
}
SWEEP = [(bn, bk, w) for bn in (8, 16) for bk in (256, 1024, 2048) for w in (4, 8)]
CALLS = 24  # per CUDA graph
L2_COPIES_BYTES = 256 << 20  # weight copies rotated through: several times any L2


@dataclass(frozen=True)
class Pair:
    """One fused linear of a model: its prologue, weight shape and norm group."""

    model: str
    layer: str
    prologue: str
    n: int
    k: int
    group: int  # channels per norm group (the gated norm's; k for the others)
    count: int  # matrices of this shape a decode step reads


def model_pairs(names: list[str]) -> list[Pair]:
    """The fused linears of the named zoo models, from their configs."""
    pairs = []
    for lin in model_linears(names):
        if lin.layer not in PROLOGUES:
            continue
        group = lin.k
        if PROLOGUES[lin.layer] == "gated_norm":
            cfg = zoo_config(lin.model)
            group = lin.k // (cfg.get("mamba_n_groups") or cfg["n_groups"])
        pairs.append(Pair(lin.model, lin.layer, PROLOGUES[lin.layer], lin.n, lin.k, group,
                          lin.count))  # fmt: skip
    return pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the docs table of a results file")
    parser.add_argument("--no-sweep", action="store_true", help="default tiles only")
    return parser.parse_args(argv)


# -- measuring (on a GPU) --------------------------------------------------------------------


def _graph_us(fn: Any, reps: int = 20) -> float:
    """Median microseconds per call of ``fn(i)``, CALLS calls replayed from one graph."""
    return graph_us(fn, CALLS, reps)


def measure_pair(pair: Pair, sweep: bool) -> dict[str, Any]:
    """Every timing of one fused linear (see the module doc)."""
    import torch
    import torch.nn.functional as F

    from avmp.kernels.triton import activations, rms_norm
    from avmp.kernels.triton import prologue_linear as pl

    dev, bf = torch.device("cuda"), torch.bfloat16
    copies = max(2, min(12, L2_COPIES_BYTES // (pair.n * pair.k * 2)))
    ws = [torch.randn(pair.n, pair.k, device=dev, dtype=bf) * pair.k**-0.5 for _ in range(copies)]
    x, aux = (torch.randn(1, pair.k, device=dev, dtype=bf) for _ in range(2))
    nw = torch.randn(pair.k, device=dev, dtype=bf)
    kind = pair.prologue

    def unfused(i: int) -> torch.Tensor:
        w = ws[i % copies]
        if kind == "add_norm":
            return F.linear(rms_norm.add_rms_norm(x, aux, nw, 1e-5, 0.5)[1], w)
        if kind == "norm":
            return F.linear(rms_norm.rms_norm(x, nw, 1e-5), w)
        if kind == "gated_norm":
            return F.linear(rms_norm.rms_norm(x, nw, 1e-5, aux, pair.group), w)
        if kind == "silu_mul":
            return F.linear(activations.silu_mul(x, aux), w)
        return F.linear(activations.relu_squared(x), w)

    def fused(i: int, block: tuple[int, int, int] | None = None, pdl: bool = False) -> Any:
        w = ws[i % copies]
        if kind in ("add_norm", "norm"):
            delta = aux if kind == "add_norm" else None
            return pl.norm_linear(x, nw, 1e-5, w, None, delta, 0.5, block=block, pdl=pdl)[1]
        if kind == "gated_norm":
            return pl.gated_norm_linear(x, aux, nw, 1e-5, pair.group, w, block=block, pdl=pdl)
        return pl.act_linear(x, w, aux if kind == "silu_mul" else None, block=block, pdl=pdl)

    want = unfused(0).float()
    error = ((fused(0).float() - want).abs().max() / want.abs().max()).item()
    cell: dict[str, Any] = {
        **asdict(pair),
        "weight_bytes": pair.n * pair.k * 2,
        "rel_error": error,
        "default_tile": list(pl.tiles(pair.n, pair.k, torch.cuda.get_device_properties(dev)
                                      .multi_processor_count)),  # fmt: skip
        "cublas_us": _graph_us(lambda i: F.linear(x, ws[i % copies])),
        "unfused_us": _graph_us(unfused),
        "fused_us": _graph_us(fused),
        "fused_pdl_us": _graph_us(lambda i: fused(i, pdl=True)),
        "sweep": [],
    }
    for block in SWEEP if sweep else []:
        try:
            cell["sweep"].append([*block, _graph_us(lambda i, b=block: fused(i, b))])
        except Exception as error:  # a tile that does not compile or fit: recorded, skipped
            cell["sweep"].append([*block, None, f"{type(error).__name__}: {error}"[:200]])
    return cell


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cells": [],
    }
    for pair in model_pairs(args.models):
        start = time.perf_counter()
        cell = measure_pair(pair, not args.no_sweep)
        result["cells"].append(cell)
        print(table_row(cell), f"({time.perf_counter() - start:.0f} s)", flush=True)
        if args.out is not None:
            write_result(args.out, result)
        torch.cuda.empty_cache()
    return result


# -- report ------------------------------------------------------------------------------------


def best_tile(cell: dict[str, Any]) -> tuple[list[int], float] | None:
    """The sweep's fastest tile and its time, if it swept."""
    timed = [row for row in cell["sweep"] if row[3] is not None]
    if not timed:
        return None
    row = min(timed, key=lambda r: r[3])
    return row[:3], row[3]


def table_row(cell: dict[str, Any]) -> str:
    gb = cell["weight_bytes"] / 1e3  # bytes / 1e3 / us = GB/s ... / 1e3 below: TB/s
    best = best_tile(cell)
    best_text = "" if best is None else f"{best[1]:.1f} ({'/'.join(map(str, best[0]))})"
    return (
        f"| {cell['model']} | {cell['layer']} | {cell['prologue']} | {cell['n']} x {cell['k']} "
        f"| {cell['cublas_us']:.1f} ({gb / cell['cublas_us'] / 1e3:.2f}) "
        f"| {cell['unfused_us']:.1f} | {cell['fused_us']:.1f} "
        f"| {cell['fused_pdl_us']:.1f} ({gb / cell['fused_pdl_us'] / 1e3:.2f}) "
        f"| {cell['unfused_us'] / cell['fused_us']:.2f}x "
        f"| {cell['unfused_us'] / cell['fused_pdl_us']:.2f}x | {best_text} |"
    )


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, Triton {result['triton']}; "
        f"one row, bf16; times in µs per call (CUDA graphs of {CALLS} calls, weights "
        "rotated out of L2), TB/s of weight bytes in brackets.",
        "",
        "| model | linear | prologue | N x K | cuBLAS alone | unfused | fused | fused + PDL "
        "| unfused / fused | unfused / fused + PDL | best swept tile (BN/BK/warps) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [table_row(cell) for cell in result["cells"]]
    by_model: dict[str, list[float]] = {}
    for cell in result["cells"]:
        saved = (cell["unfused_us"] - cell["fused_pdl_us"]) * cell["count"]
        by_model.setdefault(cell["model"], []).append(saved)
    lines += ["", "Summed over a decode step's matrices (unfused minus fused + PDL): " + "; ".join(
        f"{model} {sum(saved) / 1e3:.2f} ms" for model, saved in by_model.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return measure_or_redraw(args, "benchmarks.prologue_linear", lambda: measure(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
