"""Migration churn of the AVMP manager: the "eager" policy against "streak", in one run.

Each cell (model x budget x workload) replays one seeded trace through the simulator
twice, once per `MemoryConfig.migration_policy`, and counts from the manager's events:
migrations, chunks moved into each pool, compactions, and **reversals**. A reversal is
a migration whose recipient is the donor of the migration before it, coming within
``--window-calls`` allocator calls (admit, grow and free calls, failed ones included)
of that one: capacity flowing back where it just came from. Per preemption figures
divide by the cell's preemptions (n/a without any). The policies never differ in
whether an allocation fits, so preemptions and OOM events match; req/s differs by the
migration and compaction time the simulator charges.

    python -m benchmarks.migration_churn            # ~1-2 min on 2 CPU cores
    python -m benchmarks.migration_churn --from-json benchmarks/results/migration_churn.json.gz

Raw figures go to benchmarks/results/migration_churn.json.gz; the table is drawn from them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avmp.bench.workloads import PRESETS, ArrivalProcess, make_workload
from avmp.memory.manager import AvmpManager
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig, RequestUnits
from avmp.models import resolve_model
from avmp.sim.simulator import SimConfig, TimedAllocator, simulate
from avmp.units import parse_bytes
from benchmarks.common import RESULTS_DIR, read_result, write_result

DEFAULT_OUT = RESULTS_DIR / "migration_churn.json.gz"
MODELS = ("granite-4.0-h-tiny", "nemotron-h-8b", "jamba-1.5-mini")
WORKLOADS = ("shift", "mixed_long", "agentic_burst", "longdoc_mix", "longdoc_burst")
BUDGETS = ("4GiB", "12GiB")
OLD, NEW = "eager", "streak"


class CallClock(TimedAllocator):
    """Forwards calls like `TimedAllocator` and notes, for every memory event the
    manager appends, the allocator call (1-based) during which it happened."""

    def __init__(self, inner: AvmpManager) -> None:
        super().__init__(inner)
        self.manager = inner
        self.num_calls = 0
        self.event_calls: list[int] = []

    def _tick(self) -> None:
        self.num_calls += 1
        num_new = len(self.manager.events) - len(self.event_calls)
        self.event_calls.extend([self.num_calls] * num_new)

    def admit(self, request_id: int, num_tokens: int) -> RequestUnits | None:
        try:
            return super().admit(request_id, num_tokens)
        finally:
            self._tick()

    def grow(self, request_id: int, num_new_tokens: int) -> list[int] | None:
        try:
            return super().grow(request_id, num_new_tokens)
        finally:
            self._tick()

    def free(self, request_id: int) -> None:
        try:
            super().free(request_id)
        finally:
            self._tick()


def count_reversals(migrations: list[tuple[int, str]], window_calls: int) -> int:
    """Migrations ``(call, recipient)`` whose recipient differs from the previous
    migration's and that come at most ``window_calls`` calls after it."""
    return sum(
        1
        for (call_a, to_a), (call_b, to_b) in itertools.pairwise(migrations)
        if to_a != to_b and call_b - call_a <= window_calls
    )


@dataclass(frozen=True)
class Cell:
    model: str
    budget: str
    workload: str


def run_cell(cell: Cell, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """One replay of the cell's trace under ``policy``; its churn figures."""
    geometry = resolve_model(cell.model)
    config = MemoryConfig(parse_bytes(cell.budget), migration_policy=policy)
    manager = make_allocator("avmp", geometry, config)
    assert isinstance(manager, AvmpManager)
    clock = CallClock(manager)
    arrival = ArrivalProcess(args.arrival) if args.arrival else None
    trace = make_workload(cell.workload, args.seed, args.num_requests, arrival)
    sim = SimConfig(profile=args.profile, timeline_samples=0, admission=args.admission,
                    preemption=args.preemption)
    result = simulate(trace, clock, geometry, sim)
    migrations = [
        (call, event.pool.value)
        for call, event in zip(clock.event_calls, manager.events, strict=True)
        if event.kind == "migration"
    ]
    stats = manager.stats
    return {
        "num_preemptions": result.num_preemptions,
        "num_oom_events": result.num_oom_events,
        "num_completed": result.num_completed,
        "num_migrations": stats.num_migrations,
        "chunks_to_kv": stats.chunks_migrated_to["kv"],
        "chunks_to_state": stats.chunks_migrated_to["state"],
        "num_compactions": stats.num_compactions,
        "bytes_compacted": stats.num_bytes_compacted,
        "num_reversals": count_reversals(migrations, args.window_calls),
        "num_calls": clock.num_calls,
        "migration_s": result.phase_s["migration"] + result.phase_s["compaction"],
        "request_throughput": result.request_throughput,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    workloads = [w for w in args.workloads.split(",") if w]
    for name in workloads:
        if name not in PRESETS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(PRESETS)}")
    cells = []
    start = time.perf_counter()
    for model in args.models.split(","):
        for budget in args.budgets.split(","):
            for workload in workloads:
                cell = Cell(model, budget, workload)
                row = {"model": model, "budget": budget, "workload": workload}
                for policy in (OLD, NEW):
                    row[policy] = run_cell(cell, policy, args)
                cells.append(row)
                print(format_row(row, args.window_calls), file=sys.stderr, flush=True)
    settings = {k: getattr(args, k) for k in ("num_requests", "seed", "profile", "arrival",
                                              "admission", "preemption", "window_calls")}
    return {"settings": settings, "cells": cells,
            "measured_wall_s": round(time.perf_counter() - start, 1)}


def _per(value: float, preemptions: int) -> str:
    return f"{value / preemptions:.2f}" if preemptions else "n/a"


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old else ("1.00x" if new == old else "n/a")


HEADER = ("model | budget | workload | policy | preempt | migrations | chunks to kv / state "
          "| compactions | reversals | migr/preempt | chunks/preempt | req/s")


def format_row(row: dict[str, Any], window_calls: int) -> str:
    """Two lines (old, new) and a ratio line of one cell."""
    lines = []
    for policy in (OLD, NEW):
        r = row[policy]
        moved = r["chunks_to_kv"] + r["chunks_to_state"]
        lines.append(
            f"{row['model']} | {row['budget']} | {row['workload']} | {policy} | "
            f"{r['num_preemptions']} | {r['num_migrations']} | "
            f"{r['chunks_to_kv']} / {r['chunks_to_state']} | {r['num_compactions']} | "
            f"{r['num_reversals']} | {_per(r['num_migrations'], r['num_preemptions'])} | "
            f"{_per(moved, r['num_preemptions'])} | {r['request_throughput']:.3f}"
        )
    old, new = row[OLD], row[NEW]
    moved_old = old["chunks_to_kv"] + old["chunks_to_state"]
    moved_new = new["chunks_to_kv"] + new["chunks_to_state"]
    lines.append(
        f"  new/old: migrations {_ratio(new['num_migrations'], old['num_migrations'])}, "
        f"chunks moved {_ratio(moved_new, moved_old)}, "
        f"compactions {_ratio(new['num_compactions'], old['num_compactions'])}, "
        f"reversals (<= {window_calls} calls) "
        f"{_ratio(new['num_reversals'], old['num_reversals'])}, "
        f"req/s {_ratio(new['request_throughput'], old['request_throughput'])}"
    )
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The whole table plus totals over every cell."""
    window = result["settings"]["window_calls"]
    lines = [f"settings: {result['settings']}", HEADER]
    lines += [format_row(row, window) for row in result["cells"]]
    totals = {}
    for policy in (OLD, NEW):
        rows = [row[policy] for row in result["cells"]]
        totals[policy] = {k: sum(r[k] for r in rows) for k in (
            "num_preemptions", "num_migrations", "chunks_to_kv", "chunks_to_state",
            "num_compactions", "num_reversals", "num_oom_events")}
    lines.append("totals over all cells:")
    for policy in (OLD, NEW):
        t = totals[policy]
        moved = t["chunks_to_kv"] + t["chunks_to_state"]
        lines.append(
            f"  {policy}: preemptions {t['num_preemptions']}, OOM events {t['num_oom_events']}, "
            f"migrations {t['num_migrations']} ({_per(t['num_migrations'], t['num_preemptions'])}"
            f" per preemption), chunks to kv / state {t['chunks_to_kv']} / "
            f"{t['chunks_to_state']} ({_per(moved, t['num_preemptions'])} per preemption), "
            f"compactions {t['num_compactions']}, reversals {t['num_reversals']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--num-requests", type=int, default=192,
                        help="requests per trace (default 192, fewer than the presets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="h200")
    parser.add_argument("--arrival", default="burst",
                        help="arrival process (default burst: all at t = 0, as the engine "
                             "run of issue 12); '' keeps each preset's")
    parser.add_argument("--admission", default="greedy",
                        help="scheduler admission (default greedy: the churn case)")
    parser.add_argument("--preemption", default="recompute")
    parser.add_argument("--window-calls", type=int, default=2048,
                        help="a reversal comes within this many allocator calls")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-json", type=Path, help="redraw a saved result, run nothing")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        print(format_table(read_result(args.from_json)))
        return 0
    if args.num_requests < 1 or args.window_calls < 0:
        parser.error("--num-requests must be >= 1 and --window-calls >= 0")
    result = run(args)
    write_result(args.out, result)
    print(format_table(result))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
