"""Prefix caching for hybrids in the simulator: AVMP's placement (Marconi's rules) against
vLLM's align mode and SGLang's rule, on the same tree, allocator and budget.

Each cell (workload x model x budget) replays one seeded trace through the simulator
with the AVMP allocator, once without a prefix cache and once per policy: ``avmp``
(checkpoints at output ends and branch points, evicted by recency plus FLOPs saved per
byte), ``avmp+host`` (the same with the host tier as a second level for the checkpoints
the device evicts, `SimConfig.prefix_host_level`), ``avmp-lru`` (the same placement, LRU
eviction), ``vllm-align`` (states at block-aligned step ends, vLLM's block of the model
from the unified layout, LRU) and ``sglang`` (every max(64, page) prompt tokens and 256
decode tokens, LRU). Reported: the token hit rate against the ideal (every token of a
prompt that an earlier request's prompt or output holds, in whole pages, reused), AVMP's
hits over vLLM's and SGLang's, TTFT p50/p99 and req/s with and without the cache, and
the peak bytes of checkpoints; the bars count ``avmp`` alone and with its host level.
``sharegpt`` (ShareGPT first turns: no reuse) checks that caching costs nothing there.

    python -m benchmarks.prefix                 # ~3-5 min on one CPU core
    python -m benchmarks.prefix --from-json benchmarks/results/prefix.json.gz

Raw figures go to benchmarks/results/prefix.json.gz; the table is drawn from them.

``--host-level`` measures the host tier as a second level for evicted checkpoints
instead: ``avmp`` without and with it (``avmp+host``, `SimConfig.prefix_host_level`;
the host tier is the simulator's default, twice the budget) at small budgets, where the
device level evicts checkpoints that later turns need. Raw figures go to
benchmarks/results/prefix_host.json.gz.

    python -m benchmarks.prefix --host-level    # ~1-2 min on one CPU core
    python -m benchmarks.prefix --host-level --from-json benchmarks/results/prefix_host.json.gz
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
HOST_OUT = RESULTS_DIR / "prefix_host.json.gz"
HOST_BUDGETS = ("2GiB", "4GiB")
HOST_POLICIES = ("avmp", "avmp+host")
MODELS = ("nemotron-h-8b", "granite-4.0-h-tiny", "jamba-1.5-mini")
WORKLOADS = (*PREFIX_PRESETS, "sharegpt")
BUDGETS = ("8GiB", "32GiB")
POLICIES = ("off", "avmp", "avmp+host", "avmp-lru", "vllm-align", "sglang")
HIT_POLICIES = ("avmp", "avmp-lru", "vllm-align", "sglang")  # the table's hit columns
OURS = ("avmp", "avmp+host")  # the policies the bars count
PROFILE = "h200"  # Jamba-1.5-Mini's 96 GiB of weights fit in its 141 GB
NUM_REQUESTS = 256


def trace(workload: str, seed: int, num_requests: int) -> list[RequestSpec]:
    if workload == "sharegpt":
        return make_workload("sharegpt_replay", seed, num_requests)
    return make_prefix_workload(workload, seed, num_requests, progress=sys.stderr.isatty())


def run_cell(workload: str, model: str, budget: str, requests: list[RequestSpec],
             policies: tuple[str, ...] = POLICIES) -> dict[str, Any]:  # fmt: skip
    """Every policy on one trace, model and budget (``-lru``: LRU eviction; ``+host``:
    the host tier as a second level)."""
    geometry = resolve_model(model)
    cell: dict[str, Any] = {"workload": workload, "model": model, "budget": budget}
    for policy in policies:
        host_level = policy.endswith("+host")
        name = policy.removesuffix("+host")
        name, eviction = (name.removesuffix("-lru"), "lru") if name.endswith("-lru") else (
            name, None)  # fmt: skip
        allocator = make_allocator("avmp", geometry, MemoryConfig(parse_bytes(budget)))
        config = SimConfig(profile=PROFILE, prefix_cache=name, prefix_eviction=eviction,
                           prefix_host_level=host_level, timeline_samples=0)  # fmt: skip
        result = simulate(requests, allocator, geometry, config)
        cell[policy] = {
            "num_completed": result.num_completed,
            "ttft_p50_s": result.ttft_p50_s,
            "ttft_p99_s": result.ttft_p99_s,
            "request_throughput": result.request_throughput,
            "num_preemptions": result.num_preemptions,
            "prefix": result.prefix,
            "swap_s": result.phase_s["swap"],
        }
    return cell


def run(models: tuple[str, ...], budgets: tuple[str, ...], workloads: tuple[str, ...],
        num_requests: int, seed: int, policies: tuple[str, ...] = POLICIES
        ) -> dict[str, Any]:  # fmt: skip
    cells = []
    started = time.perf_counter()
    for workload in workloads:
        requests = trace(workload, seed, num_requests)
        for model, budget in itertools.product(models, budgets):
            cells.append(run_cell(workload, model, budget, requests, policies))
            print(f"  {workload} {model} {budget}: {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)  # fmt: skip
    return {
        "settings": {"profile": PROFILE, "num_requests": num_requests, "seed": seed,
                     "allocator": "avmp", "policies": list(policies)},
        "cells": cells,
    }  # fmt: skip


def _rate(cell: dict[str, Any], policy: str) -> float:
    return float(cell[policy]["prefix"]["hit_rate_vs_ideal"])


def _times(value: float, reference: float) -> str:
    if reference > 0:
        return f"{value / reference:.1f}x"
    return "n/a" if value == 0 else "inf"


def table(result: dict[str, Any]) -> str:
    header = ["workload", "model", "budget", "hit/ideal avmp", "avmp+host", "avmp-lru",
              "vllm-align", "sglang", "avmp / vllm", "avmp / sglang", "TTFT p50 off / avmp s",
              "TTFT p99 off / avmp s", "req/s off / avmp", "ckpt GiB avmp / sglang"]  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in result["cells"]:
        off, avmp, sglang = cell["off"], cell["avmp"], cell["sglang"]
        hits = {p: cell[p]["prefix"]["num_hit_tokens"] for p in HIT_POLICIES}
        gib = 1 << 30
        ideal = avmp["prefix"]["num_ideal_tokens"]
        rates = [f"{_rate(cell, p):.0%}" if ideal and p in cell else "-"
                 for p in (HIT_POLICIES[0], "avmp+host", *HIT_POLICIES[1:])]  # fmt: skip
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


def host_table(result: dict[str, Any]) -> str:
    """``avmp`` without and with the host level, per cell: hits against the ideal, TTFT
    p50/p99, req/s, and what the host level did (checkpoints kept and restored, the
    seconds its copies and requests' swaps took at the host link)."""
    header = ["workload", "model", "budget", "hit/ideal avmp / +host", "TTFT p50 ms",
              "TTFT p99 ms", "req/s", "ckpts kept / restored / dropped",
              "host copy s"]  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in result["cells"]:
        off, on = cell["avmp"], cell["avmp+host"]
        host = on["prefix"].get("host_level", {})
        ideal = off["prefix"]["num_ideal_tokens"]
        hits = (f"{_rate(cell, 'avmp'):.1%} / {_rate(cell, 'avmp+host'):.1%}" if ideal
                else "-")  # fmt: skip
        rows.append("| " + " | ".join([
            cell["workload"], cell["model"], cell["budget"], hits,
            f"{off['ttft_p50_s'] * 1e3:.1f} / {on['ttft_p50_s'] * 1e3:.1f}",
            f"{off['ttft_p99_s'] * 1e3:.1f} / {on['ttft_p99_s'] * 1e3:.1f}",
            f"{off['request_throughput']:.3f} / {on['request_throughput']:.3f}",
            f"{host.get('num_kept', 0)} / {host.get('num_restored', 0)} / "
            f"{host.get('num_dropped', 0)}",
            f"{on['swap_s']:.3f}",
        ]) + " |")  # fmt: skip
    return "\n".join(rows)


def bars(result: dict[str, Any]) -> str:
    """The issue's simulator bars, counted over the cells for ``avmp`` and (where the
    result has it) ``avmp+host``: hits >= 90% of the ideal, >= 2x vLLM align's and >=
    SGLang's rule's (cells with reuse), and req/s with the cache never below req/s
    without it (cells without reuse)."""
    cells = result["cells"]
    lines = []
    for ours in (p for p in OURS if all(p in c for c in cells)):
        reuse = [c for c in cells if c["avmp"]["prefix"]["num_ideal_tokens"]]
        hits = [{p: c[p]["prefix"]["num_hit_tokens"] for p in (ours, *HIT_POLICIES[2:])}
                for c in reuse]  # fmt: skip
        counts = {
            ">= 90% of the ideal": sum(_rate(c, ours) >= 0.9 for c in reuse),
            ">= 2x vllm-align's hits": sum(h[ours] >= 2 * h["vllm-align"] for h in hits),
            ">= sglang's hits": sum(h[ours] >= h["sglang"] for h in hits),
        }
        lines += [f"{ours}: {name}: {n} of {len(reuse)} cells with reuse"
                  for name, n in counts.items()]  # fmt: skip
        if ours == OURS[0]:  # the ideal (every reusable token hit) bounds any policy
            within = sum(2 * _rate(c, "vllm-align") <= 1.0 for c in reuse)
            lines.append(f"2x vllm-align's hits within the ideal (reachable by any policy): "
                         f"{within} of {len(reuse)} cells with reuse")
        plain = [c for c in cells if not c["avmp"]["prefix"]["num_ideal_tokens"]]
        slower = [c for c in plain
                  if c[ours]["request_throughput"] < c["off"]["request_throughput"]]  # fmt: skip
        lines.append(f"{ours}: req/s with the cache below without it: {len(slower)} of "
                     f"{len(plain)} cells without reuse" + "".join(
                         f"; {c['workload']} {c['model']} {c['budget']} "
                         f"{c['off']['request_throughput']:.4f} -> "
                         f"{c[ours]['request_throughput']:.4f}" for c in slower))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", help=f"default {','.join(BUDGETS)} "
                        f"({','.join(HOST_BUDGETS)} with --host-level)")  # fmt: skip
    parser.add_argument("--workloads", help=f"default {','.join(WORKLOADS)} (the prefix "
                        "presets with --host-level)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT} ({HOST_OUT} with "
                        "--host-level)")  # fmt: skip
    parser.add_argument("--from-json", type=Path, help="print the table of a saved result")
    parser.add_argument("--host-level", action="store_true",
                        help="avmp without and with the host tier as a second level")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json is not None:
        print(_show(read_result(args.from_json), args.host_level))
        return 0
    split = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    host = args.host_level
    budgets = split(args.budgets) if args.budgets else (HOST_BUDGETS if host else BUDGETS)
    # ShareGPT first turns evict nothing that anyone reuses: the presets only
    default_workloads = tuple(PREFIX_PRESETS) if host else WORKLOADS
    workloads = split(args.workloads) if args.workloads else default_workloads
    result = run(split(args.models), budgets, workloads, args.requests, args.seed,
                 HOST_POLICIES if host else POLICIES)  # fmt: skip
    write_result(args.out or (HOST_OUT if host else DEFAULT_OUT), result)
    print(_show(result, host))
    return 0


def _show(result: dict[str, Any], host_level: bool) -> str:
    return host_table(result) if host_level else table(result) + "\n\n" + bars(result)


if __name__ == "__main__":
    raise SystemExit(main())
