"""Prefix caching on trace files that say what their prompts share (Mooncake's
``hash_ids``, JSONL ``segments``): every policy of `benchmarks.prefix` on the same
requests, model and budget, in the simulator with the AVMP allocator.

Public traces are cluster-scale: Mooncake's (kvcache-ai/Mooncake, FAST'25) arrive faster
than one GPU serves, so every policy queues for minutes and TTFT measures the queue.
``--rows`` keeps the first rows and ``--stretch`` multiplies their arrival times, so
that one GPU keeps up and the cache, not the queue, decides TTFT.

    python -m benchmarks.prefix_traces conversation_trace.jsonl synthetic_trace.jsonl \\
        --rows 1500 --stretch 5 --memory 32GiB
    python -m benchmarks.prefix_traces --from-json benchmarks/results/prefix_traces.json.gz

Raw figures go to benchmarks/results/prefix_traces.json.gz (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from avmp.bench.traces import read_trace
from benchmarks.common import RESULTS_DIR, read_result, write_result
from benchmarks.prefix import PROFILE, run_cell

DEFAULT_OUT = RESULTS_DIR / "prefix_traces.json.gz"
POLICIES = ("off", "avmp", "vllm-align", "sglang")


def run(paths: list[Path], model: str, memory: str, rows: int, stretch: float,
        fmt: str | None) -> dict[str, Any]:  # fmt: skip
    cells = []
    started = time.perf_counter()
    for path in paths:
        requests = read_trace(path, fmt)[:rows]
        requests = [dataclasses.replace(r, arrival_s=r.arrival_s * stretch) for r in requests]
        cell = run_cell(path.name, model, memory, requests, POLICIES)
        cell["num_requests"] = len(requests)
        cells.append(cell)
        print(f"  {path.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    settings = {"profile": PROFILE, "model": model, "memory": memory, "rows": rows,
                "stretch": stretch, "allocator": "avmp", "policies": list(POLICIES)}  # fmt: skip
    return {"settings": settings, "cells": cells}


def table(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"{settings['model']}, {settings['memory']}, {settings['profile']} profile, first "
        f"{settings['rows']} rows, arrivals x{settings['stretch']:g}",
        "",
        "| trace | policy | hit / ideal | TTFT p50 s | TTFT p99 s | req/s | checkpoints taken |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in result["cells"]:
        for policy in POLICIES:
            run = cell[policy]
            prefix = run["prefix"] or {}
            hit = f"{prefix['hit_rate_vs_ideal']:.1%}" if prefix else "-"
            taken = prefix.get("num_checkpoints_taken", "-")
            lines.append(f"| {cell['workload']} | {policy} | {hit} | {run['ttft_p50_s']:.3f} | "
                         f"{run['ttft_p99_s']:.3f} | {run['request_throughput']:.4f} | "
                         f"{taken} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="*", type=Path, help="trace files")
    parser.add_argument("--format", help="trace format (default: guessed from each file)")
    parser.add_argument("--model", default="nemotron-h-8b")
    parser.add_argument("--memory", default="32GiB")
    parser.add_argument("--rows", type=int, default=1500, help="first rows kept (default 1500)")
    parser.add_argument("--stretch", type=float, default=1.0,
                        help="arrival times multiplied by this (default 1)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-json", type=Path, help="print the table of a saved result")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        print(table(read_result(args.from_json)))
        return 0
    if not args.traces:
        parser.error("give at least one trace file (or --from-json)")
    if args.rows < 1 or not args.stretch > 0:
        parser.error("--rows must be >= 1 and --stretch > 0")
    missing = [str(p) for p in args.traces if not p.is_file()]
    if missing:
        parser.error(f"no such trace file: {', '.join(missing)}")
    try:
        result = run(args.traces, args.model, args.memory, args.rows, args.stretch, args.format)
    except ValueError as error:  # a bad trace line, an unknown model: one line
        parser.exit(2, f"error: {error}\n")
    write_result(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
