"""``avmp replay TRACE``: replay one trace file with every allocator and compare them."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from avmp.cli import UserError, parse_budget
from avmp.units import format_bytes

COLUMNS = (
    "allocator",
    "completed",
    "rejected",
    "req/s",
    "out tok/s",
    "vs avmp",
    "OOM events",
    "TTFT p50/p99 s",
    "TPOT p50/p99 ms",
    "makespan s",
)


def add_parser(subparsers: Any) -> None:
    from avmp.bench.sweep import ALLOCATORS, PROFILES
    from avmp.bench.traces import FORMATS

    parser = subparsers.add_parser(
        "replay",
        help="replay a trace file with every allocator",
        description="Replay one trace (JSONL, Azure LLM inference CSV or BurstGPT CSV) "
        "through the simulator with each allocator, on the same requests.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace file")
    parser.add_argument("--model", required=True, help="zoo model name")
    parser.add_argument("--memory", required=True, help="cache memory budget, e.g. 12GiB")
    parser.add_argument("--format", choices=FORMATS, help="trace format (default: guessed)")
    parser.add_argument("--profile", choices=PROFILES, default="h100", help="GPU time model")
    parser.add_argument(
        "--allocators",
        default=",".join(ALLOCATORS),
        help="comma-separated allocators (default: all)",
    )
    parser.add_argument("--calibration", metavar="FILE", help="step-time calibration JSON")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.set_defaults(run=run)


def replay(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the trace once per allocator; returns each allocator's result dict.

    Raises:
        UserError: a bad argument, or a trace none of whose requests fits in the
            budget with any allocator (every row would say 0 completed).
    """
    from avmp.bench.sweep import make_allocator
    from avmp.bench.traces import read_trace
    from avmp.models.zoo import resolve_model
    from avmp.sim.simulator import SimConfig, simulate

    budget = parse_budget("--memory", args.memory)
    allocators = _allocators(args.allocators)
    if args.calibration is not None:
        with open(args.calibration):
            pass  # a missing file (or a directory) is a one-line error, before any work
    geometry = resolve_model(args.model)
    requests = read_trace(args.trace, args.format)
    config = SimConfig(profile=args.profile, calibration=args.calibration)
    results = [
        simulate(requests, make_allocator(a, geometry, budget), geometry, config).to_dict()
        for a in allocators
    ]
    if all(r["num_completed"] == 0 for r in results):
        smallest = min(geometry.request_bytes(r.total_tokens) for r in requests)
        raise UserError(
            f"{args.trace}: no request fits in {format_bytes(budget)} with any allocator "
            f"(the smallest needs {format_bytes(smallest)}); check --memory and the trace's "
            "token counts"
        )
    return results


def _allocators(text: str) -> list[str]:
    from avmp.bench.sweep import ALLOCATORS

    allocators = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in allocators if a not in ALLOCATORS]
    if unknown or not allocators:
        raise UserError(
            f"unknown allocator {unknown[0] if unknown else '(none)'!r}; "
            f"known: {', '.join(ALLOCATORS)}"
        )
    return allocators


def _row(result: dict[str, Any], reference: float) -> list[str]:
    ratio = result["request_throughput"] / reference if reference > 0 else math.nan
    return [
        result["allocator"],
        str(result["num_completed"]),
        str(result["num_rejected"]),
        f"{result['request_throughput']:.3f}",
        f"{result['output_token_throughput']:.1f}",
        "n/a" if math.isnan(ratio) else f"{ratio:.2f}x",
        str(result["num_oom_events"]),
        f"{result['ttft_p50_s']:.2f} / {result['ttft_p99_s']:.2f}",
        f"{result['tpot_p50_s'] * 1e3:.1f} / {result['tpot_p99_s'] * 1e3:.1f}",
        f"{result['makespan_s']:.1f}",
    ]


def run(args: argparse.Namespace) -> int:
    from avmp.bench.report import markdown_table

    results = replay(args)
    if args.json:
        print(json.dumps(results, indent=1, sort_keys=True))
        return 0
    avmp = [r for r in results if r["allocator"] == "avmp"]
    reference = avmp[0]["request_throughput"] if avmp else math.nan
    print(
        f"{args.trace}: {results[0]['num_requests']} requests, {args.model}, "
        f"{format_bytes(parse_budget('--memory', args.memory))}, profile {args.profile}"
    )
    print(markdown_table((list(COLUMNS), [_row(r, reference) for r in results])))
    return 0
