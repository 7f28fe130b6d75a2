"""One mixture-of-experts layer's routed experts on one GPU: the grouped path
(`avmp.engine.experts.grouped_experts`, pairs sorted on the device and two
``torch._grouped_mm`` over stacked weights) against the per-expert loop
(`avmp.engine.experts.run_experts`, a ``torch.where`` and a host sync per expert), in
milliseconds per layer (issue 17).

Geometry: the expert layer of Qwen3-Next-80B-A3B (hidden 2048, expert width 512, top-10
routing, gated SiLU experts) with 128 routed experts, as ``benchmarks.families`` scales
it (``--experts 512`` for the published count), bf16 weights built on the GPU in the
engine's stacked container (`avmp.engine.experts.ExpertSlice`, the torch reference
activation). Routing: a random softmax router's top-k, weights renormalised (random
inputs route nearly uniformly). Only the experts are timed, not the router.

Cells: decode (``--batch`` tokens, 64) and prefill (``--prefill-tokens``, 4096), each
through the loop, the grouped path, and, for decode, the grouped path replayed from a
CUDA graph (what the engine's decode graphs run). Medians of ``--repeats`` CUDA-event
timings after warm-up; each cell records the relative error of its output against the
loop's. Decode's floor is the expert bytes a step is expected to read (with ``E``
experts, top-``k`` routing and ``B`` tokens an expert is used with probability
``1 - (1 - k/E)^B``) over the device-to-device copy bandwidth measured in the run;
prefill's rate is ``2 x 3 x hidden x width`` FLOPs per (token, expert) pair.

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.moe --out $OUT/moe_h200.json.gz
    python3 -m benchmarks.moe --markdown $OUT/moe_h200.json.gz

``--smoke`` runs every cell on tiny widths in float32 on the CPU (the grouped path
forced; wall-clock times): a test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from avmp.engine.experts import ExpertSlice, can_group, set_grouped
from avmp.engine.models.layers import GatedMLP, local_experts
from avmp.engine.parallel.group import SINGLE
from benchmarks.common import (
    copy_bytes_per_s,
    event_ms,
    read_result,
    rel_error,
    wall_ms,
    write_result,
)


@dataclass(frozen=True)
class Layer:
    """One MoE layer's routed experts."""

    hidden: int = 2048
    width: int = 512
    experts: int = 128
    top_k: int = 10

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden * self.width * dtype.itemsize

    def pair_flops(self) -> int:
        """FLOPs of one (token, expert) pair: gate, up and down projections."""
        return 2 * 3 * self.hidden * self.width


SMOKE_LAYER = Layer(hidden=64, width=32, experts=8, top_k=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Layer()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the table of a results file")
    parser.add_argument("--experts", type=int, default=defaults.experts)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--batch", type=int, default=64, help="decode tokens")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny widths, float32 on the CPU, wall-clock times")  # fmt: skip
    args = parser.parse_args(argv)
    if args.markdown is None and min(args.experts, args.top_k, args.batch, args.repeats,
                                     args.prefill_tokens) < 1:  # fmt: skip
        parser.error("--experts, --top-k, --batch, --prefill-tokens, --repeats must be >= 1")
    if args.markdown is None and args.top_k > args.experts:
        parser.error("--top-k must not exceed --experts")
    return args


# -- building and timing -----------------------------------------------------------------


def build_experts(layer: Layer, device: torch.device, dtype: torch.dtype, seed: int) -> ExpertSlice:
    """The layer's experts in the engine's stacked container, random weights (std 0.02)."""
    torch.manual_seed(seed)
    with torch.device(device):
        experts = local_experts(
            lambda: GatedMLP(layer.hidden, layer.width, "silu"), layer.experts, SINGLE
        )
    experts.to(dtype)
    with torch.no_grad():
        for stack in experts.stacks.values():
            stack.normal_(0.0, 0.02)
    return experts


def routing(
    layer: Layer, tokens: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens and their top-k experts from a random softmax router, weights renormalised."""
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, layer.hidden, device=device, generator=generator)
    router = torch.randn(layer.experts, layer.hidden, device=device, generator=generator)
    probs = torch.softmax(x @ router.T / layer.hidden**0.5, dim=-1)
    weights, index = probs.topk(layer.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return x.to(dtype), index, weights.to(dtype)


def graph_runner(experts: ExpertSlice, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """The grouped forward captured in a CUDA graph over ``inputs``; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            experts(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        experts(*inputs)
    return graph.replay


def time_cell(
    experts: ExpertSlice,
    inputs: tuple[torch.Tensor, ...],
    reference: torch.Tensor,
    path: str,
    repeats: int,
) -> dict[str, Any]:
    """Median ms of one path on ``inputs`` and its output's error against ``reference``."""
    cuda = inputs[0].device.type == "cuda"
    set_grouped(experts, path != "loop")
    with torch.inference_mode():
        error = rel_error(experts(*inputs), reference)
        run = graph_runner(experts, inputs) if path == "graph" else lambda: experts(*inputs)
        ms = event_ms(run, repeats) if cuda else wall_ms(run, repeats)
    return {"path": path, "ms": ms, "rel_error": error}


def run_phase(
    experts: ExpertSlice, layer: Layer, phase: str, tokens: int, args: argparse.Namespace
) -> dict[str, Any]:
    device, dtype = experts.stacks["up"].device, experts.stacks["up"].dtype
    inputs = routing(layer, tokens, device, dtype, args.seed + 1)
    set_grouped(experts, False)
    with torch.inference_mode():
        reference = experts(*inputs)
    paths = ["loop", "grouped"] + (["graph"] if phase == "decode" and device.type == "cuda" else [])
    cells = [time_cell(experts, inputs, reference, path, args.repeats) for path in paths]
    used = 1.0 - (1.0 - layer.top_k / layer.experts) ** tokens
    return {
        "phase": phase,
        "tokens": tokens,
        "cells": cells,
        "expected_read_bytes": layer.experts * used * layer.expert_bytes(dtype),
        "flops": tokens * layer.top_k * layer.pair_flops(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("benchmarks.moe needs a CUDA GPU (or --smoke, on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layer = SMOKE_LAYER if args.smoke else Layer(experts=args.experts, top_k=args.top_k)
    experts = build_experts(layer, device, dtype, args.seed)
    probe = torch.zeros(1, layer.hidden, device=device, dtype=dtype)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "layer": asdict(layer),
        "grouped_kernel": can_group(probe, experts.stacks["up"], experts.stacks["down"]),
        "copy_bytes_per_s": copy_bytes_per_s(
            device, (1 << 31) if cuda else (1 << 24), None if cuda else wall_ms
        ),  # fmt: skip
        "repeats": args.repeats,
        "phases": [],
    }
    phases = [("decode", 2 if args.smoke else args.batch),
              ("prefill", 70 if args.smoke else args.prefill_tokens)]  # fmt: skip
    for phase, tokens in phases:
        results["phases"].append(run_phase(experts, layer, phase, tokens, args))
        if args.out is not None:
            write_result(args.out, results)
    print(markdown(results))
    return 0


# -- report ------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    layer = results["layer"]
    kernel = "the grouped GEMM kernel" if results["grouped_kernel"] else "torch's fallback"
    lines = [
        f"{results['device']}{' (smoke run)' if results['smoke'] else ''}, torch "
        f"{results['torch']}, {results['dtype']}; one layer of {layer['experts']} experts "
        f"(hidden {layer['hidden']}, width {layer['width']}, top-{layer['top_k']}), grouped "
        f"path on {kernel}; copy bandwidth {results['copy_bytes_per_s'] / 1e12:.2f} TB/s; "
        f"medians of {results['repeats']}.",
        "",
        "| phase | tokens | path | ms per layer | vs loop | floor ms | TFLOP/s | rel. error |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for phase in results["phases"]:
        loop = next(c["ms"] for c in phase["cells"] if c["path"] == "loop")
        floor = phase["expected_read_bytes"] / results["copy_bytes_per_s"] * 1e3
        for cell in phase["cells"]:
            lines.append(
                f"| {phase['phase']} | {phase['tokens']:,} | {cell['path']} | {cell['ms']:.3f} "
                f"| {loop / cell['ms']:.1f}x | {floor:.3f} | "
                f"{phase['flops'] / cell['ms'] / 1e9:.1f} | {cell['rel_error']:.1e} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
