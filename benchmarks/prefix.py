"""Prefix caching for hybrids in the simulator: AVMP's placement (Marconi's rules) against
vLLM's align mode and SGLang's rule, on the same tree, allocator and budget.

Each cell (workload x model x budget) replays one seeded trace through the simulator
with the AVMP allocator, once without a prefix cache and once per policy: ``avmp``
(checkpoints at output ends and branch points, evicted by recency plus FLOPs saved per
byte), ``avmp-lru`` (the same placement, LRU eviction), ``vllm-align`` (states at
block-aligned step ends, vLLM's block of the model from the unified layout, LRU) and
``sglang`` (every max(64, page) prompt tokens and 256 decode tokens, LRU). Reported: the
token hit rate against the ideal (every token of a prompt that an earlier request's
prompt or output holds, in whole pages, reused), AVMP's hits over vLLM's and SGLang's,
TTFT p50/p99 and req/s with and without the cache, and the peak bytes of checkpoints.
``sharegpt`` (ShareGPT first turns: no reuse) checks that caching costs nothing there.

    python -m benchmarks.prefix                 # ~3-5 min on one CPU core
    python -m benchmarks.prefix --from-json benchmarks/results/prefix.json.gz

Raw figures go to benchmarks/results/prefix.json.gz; the table is drawn from them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

from avmp.bench.workloads import PREFIX_PRESETS, make_prefix_workload, make_workload
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.models import resolve_model
from avmp.sched.request import RequestSpec
from avmp.sim.simulator import SimConfig, simulate
from avmp.units import parse_bytes
from benchmarks.common import RESULTS_DIR, read_result, write_result

DEFAULT_OUT = RESULTS_DIR / "prefix.json.gz"
MODELS = ("nemotron-h-8b", "granite-4.0-h-tiny", "jamba-1.5-mini")
WORKLOADS = (*PREFIX_PRESETS, "sharegpt")
BUDGETS = ("8GiB", "32GiB")
POLICIES = ("off", "avmp", "avmp-lru", "vllm-align", "sglang")
PROFILE = "h200"  # Jamba-1.5-Mini's 96 GiB of weights fit in its 141 GB
NUM_REQUESTS = 256


def trace(workload: str, seed: int, num_requests: int) -> list[RequestSpec]:
    if workload == "sharegpt":
        return make_workload("sharegpt_replay", seed, num_requests)
    return make_prefix_workload(workload, seed, num_requests)


def run_cell(workload: str, model: str, budget: str, requests: list[RequestSpec]
             ) -> dict[str, Any]:  # fmt: skip
    """Every policy on one trace, model and budget."""
    geometry = resolve_model(model)
    cell: dict[str, Any] = {"workload": workload, "model": model, "budget": budget}
    for policy in POLICIES:
        name, eviction = (policy.removesuffix("-lru"), "lru") if policy.endswith("-lru") else (
            policy, None)  # fmt: skip
        allocator = make_allocator("avmp", geometry, MemoryConfig(parse_bytes(budget)))
        config = SimConfig(profile=PROFILE, prefix_cache=name, prefix_eviction=eviction,
                           timeline_samples=0)  # fmt: skip
        result = simulate(requests, allocator, geometry, config)
        cell[policy] = {
            "num_completed": result.num_completed,
            "ttft_p50_s": result.ttft_p50_s,
            "ttft_p99_s": result.ttft_p99_s,
            "request_throughput": result.request_throughput,
            "num_preemptions": result.num_preemptions,
            "prefix": result.prefix,
        }
    return cell


def run(models: tuple[str, ...], budgets: tuple[str, ...], workloads: tuple[str, ...],
        num_requests: int, seed: int) -> dict[str, Any]:  # fmt: skip
    cells = []
    started = time.perf_counter()
    for workload in workloads:
        requests = trace(workload, seed, num_requests)
        for model, budget in itertools.product(models, budgets):
            cells.append(run_cell(workload, model, budget, requests))
            print(f"  {workload} {model} {budget}: {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)  # fmt: skip
    return {
        "settings": {"profile": PROFILE, "num_requests": num_requests, "seed": seed,
                     "allocator": "avmp", "policies": list(POLICIES)},
        "cells": cells,
    }  # fmt: skip


def _rate(cell: dict[str, Any], policy: str) -> float:
    return float(cell[policy]["prefix"]["hit_rate_vs_ideal"])


def _times(value: float, reference: float) -> str:
    if reference > 0:
        return f"{value / reference:.1f}x"
    return "n/a" if value == 0 else "inf"


def table(result: dict[str, Any]) -> str:
    header = ["workload", "model", "budget", "hit/ideal avmp", "avmp-lru", "vllm-align",
              "sglang", "avmp / vllm", "avmp / sglang", "TTFT p50 off / avmp s",
              "TTFT p99 off / avmp s", "req/s off / avmp", "ckpt GiB avmp / sglang"]  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in result["cells"]:
        off, avmp, sglang = cell["off"], cell["avmp"], cell["sglang"]
        hits = {p: cell[p]["prefix"]["num_hit_tokens"] for p in POLICIES[1:]}
        gib = 1 << 30
        ideal = avmp["prefix"]["num_ideal_tokens"]
        rates = [f"{_rate(cell, p):.0%}" if ideal else "-" for p in POLICIES[1:]]
        rows.append("| " + " | ".join([
            cell["workload"], cell["model"], cell["budget"], *rates,
            _times(hits["avmp"], hits["vllm-align"]), _times(hits["avmp"], hits["sglang"]),
            f"{off['ttft_p50_s']:.3f} / {avmp['ttft_p50_s']:.3f}",
            f"{off['ttft_p99_s']:.3f} / {avmp['ttft_p99_s']:.3f}",
            f"{off['request_throughput']:.2f} / {avmp['request_throughput']:.2f}",
            f"{avmp['prefix']['peak_checkpoint_bytes'] / gib:.1f} / "
            f"{sglang['prefix']['peak_checkpoint_bytes'] / gib:.1f}",
        ]) + " |")  # fmt: skip
    return "\n".join(rows)


def bars(result: dict[str, Any]) -> str:
    """The issue's simulator bars, counted over the cells: hits >= 90% of the ideal,
    >= 2x vLLM align's and >= SGLang's rule's (cells with reuse), and req/s with the
    cache never below req/s without it (cells without reuse)."""
    reuse = [c for c in result["cells"] if c["avmp"]["prefix"]["num_ideal_tokens"]]
    hits = [{p: c[p]["prefix"]["num_hit_tokens"] for p in POLICIES[1:]} for c in reuse]
    counts = {
        ">= 90% of the ideal": sum(_rate(c, "avmp") >= 0.9 for c in reuse),
        ">= 2x vllm-align's hits": sum(h["avmp"] >= 2 * h["vllm-align"] for h in hits),
        ">= sglang's hits": sum(h["avmp"] >= h["sglang"] for h in hits),
    }
    lines = [f"{name}: {n} of {len(reuse)} cells with reuse" for name, n in counts.items()]
    plain = [c for c in result["cells"] if not c["avmp"]["prefix"]["num_ideal_tokens"]]
    slower = [c for c in plain
              if c["avmp"]["request_throughput"] < c["off"]["request_throughput"]]  # fmt: skip
    lines.append(f"req/s with the cache below without it: {len(slower)} of {len(plain)} cells "
                 "without reuse" + "".join(
                     f"; {c['workload']} {c['model']} {c['budget']} "
                     f"{c['off']['request_throughput']:.4f} -> "
                     f"{c['avmp']['request_throughput']:.4f}" for c in slower))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-json", type=Path, help="print the table of a saved result")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved = read_result(args.from_json)
        print(table(saved) + "\n\n" + bars(saved))
        return 0
    split = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    result = run(split(args.models), split(args.budgets), split(args.workloads),
                 args.requests, args.seed)  # fmt: skip
    write_result(args.out, result)
    print(table(result) + "\n\n" + bars(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
