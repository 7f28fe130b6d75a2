"""Cost of one allocator call in CPython: admit, grow and free, per allocator.

One call sequence is recorded once (a seeded continuous-batching loop over a synthetic
trace: every step admits waiting requests up to a batch cap, grows every running request
by one token, and frees the finished ones), then replayed against a fresh allocator of
each kind, with a warm-up replay and several timed repeats. Each call is timed alone with
``time.perf_counter_ns``; the timer's own cost is measured and reported, not subtracted.

    python -m benchmarks.allocator_calls --repeats 30 --warmup 3 --docs docs/BENCHMARKS.md

Raw per-repeat figures go to benchmarks/results/allocator_calls.json (written by
`benchmarks.common.write_result` as plain JSON, since `avmp.sim.timing` reads the per-call
medians from it); the table (and the docs section, with --docs) is drawn from that file.
--from-json redraws without running.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avmp.memory.registry import ALLOCATOR_NAMES, make_allocator
from avmp.memory.spec import CacheAllocator, MemoryConfig
from avmp.memory.unified import UnifiedAllocator
from avmp.models import resolve_model
from avmp.units import parse_bytes
from benchmarks.common import REPO_ROOT, RESULTS_DIR, read_result, repo_path, write_result

ROOT = REPO_ROOT
DEFAULT_OUT = RESULTS_DIR / "allocator_calls.json"  # the name avmp.sim.timing reads
SECTION = "## Allocator call cost"
OPS = ("admit", "grow", "free")


@dataclass(frozen=True)
class TraceConfig:
    """The recorded sequence: the paper's `uniform_short` lengths, a batch cap that
    every allocator can hold at 12 GiB (so all of them replay the same calls)."""

    model: str = "jamba-1.5-mini"
    memory: str = "12GiB"
    num_requests: int = 512
    max_running: int = 256
    prompt_tokens: tuple[int, int] = (128, 1024)
    output_tokens: tuple[int, int] = (64, 256)
    seed: int = 0


Call = tuple[int, int, int]  # (op index into OPS, request id, tokens)


def record_calls(trace: TraceConfig) -> list[Call]:
    """The continuous-batching loop, independent of any allocator's answers."""
    rng = random.Random(trace.seed)
    lengths = [
        (rng.randint(*trace.prompt_tokens), rng.randint(*trace.output_tokens))
        for _ in range(trace.num_requests)
    ]
    calls: list[Call] = []
    waiting = list(range(trace.num_requests))
    left: dict[int, int] = {}
    while waiting or left:
        while waiting and len(left) < trace.max_running:
            request_id = waiting.pop(0)
            calls.append((0, request_id, lengths[request_id][0]))
            left[request_id] = lengths[request_id][1]
        for request_id in list(left):
            calls.append((1, request_id, 1))
            left[request_id] -= 1
            if left[request_id] == 0:
                calls.append((2, request_id, 0))
                del left[request_id]
    return calls


def replay(allocator: CacheAllocator, calls: list[Call]) -> tuple[list[list[int]], list[list[int]]]:
    """Run the calls; return per-op durations (ns) and units allocated per admit, per grow.

    Raises:
        RuntimeError: an allocator ran short (the sequence would no longer be the same).
    """
    clock = time.perf_counter_ns
    # A unified request holds one state block per recurrent group, not one slot, and its
    # pages come as kernel pages, several per block: units are counted in blocks.
    state_units, pages_per_unit = 1, 1
    if isinstance(allocator, UnifiedAllocator):
        state_units = allocator.vllm.num_state_groups
        pages_per_unit = (allocator.vllm.block_size or 1) // allocator.config.block_size or 1
    admit, grow, free = allocator.admit, allocator.grow, allocator.free
    times: list[list[int]] = [[], [], []]
    units: list[list[int]] = [[], []]
    for op, request_id, tokens in calls:
        if op == 0:
            start = clock()
            blocks = admit(request_id, tokens)
            times[0].append(clock() - start)
            if blocks is None:
                raise RuntimeError(f"{allocator.name}: admit {request_id} ran short")
            num_pages = len(blocks.pages) // pages_per_unit
            units[0].append(num_pages + (state_units if blocks.slot >= 0 else 0))
        elif op == 1:
            start = clock()
            added = grow(request_id, tokens)
            times[1].append(clock() - start)
            if added is None:
                raise RuntimeError(f"{allocator.name}: grow {request_id} ran short")
            units[1].append(len(added) // pages_per_unit)
        else:
            start = clock()
            free(request_id)
            times[2].append(clock() - start)
    return times, units


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(times: list[list[int]], units: list[list[int]]) -> dict[str, float]:
    """Median and p99 in microseconds per call, plus per unit allocated."""
    admits, grows, frees = times
    admit_units, grow_units = units
    alloc_grows = [t for t, n in zip(grows, grow_units, strict=True) if n]
    admit_per_unit = [t / n for t, n in zip(admits, admit_units, strict=True) if n]
    per_unit = admit_per_unit + [t / n for t, n in zip(grows, grow_units, strict=True) if n]
    out: dict[str, float] = {}
    for key, values in (
        ("admit", admits),
        ("admit_per_unit", admit_per_unit),
        ("grow", grows),
        ("grow_allocating", alloc_grows),
        ("free", frees),
        ("per_unit_allocated", per_unit),
    ):
        out[f"{key}_median_us"] = statistics.median(values) / 1000 if values else float("nan")
        out[f"{key}_p99_us"] = percentile(values, 0.99) / 1000 if values else float("nan")
    out["units_per_admit"] = statistics.mean(admit_units)
    return out


def timer_overhead_ns(samples: int = 100_000) -> float:
    clock = time.perf_counter_ns
    spans = []
    for _ in range(samples):
        start = clock()
        spans.append(clock() - start)
    return float(statistics.median(spans))


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu_model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "src/avmp/memory"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "git_commit": commit,
        "memory_tree_dirty": bool(dirty),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def run(trace: TraceConfig, names: list[str], repeats: int, warmup: int) -> dict[str, Any]:
    machine = machine_info()  # before the run: its load average is other work's
    geometry = resolve_model(trace.model)
    config = MemoryConfig(parse_bytes(trace.memory))
    calls = record_calls(trace)
    counts = {op: sum(1 for c in calls if c[0] == i) for i, op in enumerate(OPS)}
    per_repeat: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    # Round-robin over allocators, so a burst of load from other work on this shared
    # machine hits every allocator alike instead of one of them.
    for repeat in range(warmup + repeats):
        for name in names:
            allocator = make_allocator(name, geometry, config)
            gc.collect()
            times, units = replay(allocator, calls)
            if repeat >= warmup:
                per_repeat[name].append(summarize(times, units))
    results: dict[str, Any] = {}
    for name, figures in per_repeat.items():
        pooled = {k: statistics.median(r[k] for r in figures) for k in figures[0]}
        results[name] = {"median_of_repeats": pooled, "repeats": figures}
    return {
        "trace": {**trace.__dict__, "num_calls": counts},
        "unified_block_size": UnifiedAllocator(geometry, config).vllm.block_size,
        "repeats": repeats,
        "warmup": warmup,
        "timer_overhead_ns": timer_overhead_ns(),
        "gc": "enabled, collected before each replay",
        "machine": machine,
        "allocators": results,
    }


ROWS = (
    ("admit", "admit"),
    ("admit, per unit", "admit_per_unit"),
    ("per unit allocated", "per_unit_allocated"),
    ("grow", "grow"),
    ("grow +unit", "grow_allocating"),
    ("free", "free"),
)


def table(data: dict[str, Any]) -> list[str]:
    """Markdown table: median / p99 us per call, and the median's ratio to unified."""
    names = list(data["allocators"])
    base = data["allocators"].get("unified", {}).get("median_of_repeats")
    head = "| call | " + " | ".join(f"{n} median / p99 (us)" for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for label, key in ROWS:
        cells = []
        for name in names:
            fig = data["allocators"][name]["median_of_repeats"]
            cell = f"{fig[key + '_median_us']:.2f} / {fig[key + '_p99_us']:.2f}"
            if base and name != "unified":
                cell += f" ({fig[key + '_median_us'] / base[key + '_median_us']:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _load_word(machine: dict[str, Any]) -> str:
    """'loaded, ' when other work kept at least one core busy at the start."""
    return "loaded, " if machine["load_average_1min_at_start"] >= 1.0 else ""


def docs_section(data: dict[str, Any], command: str) -> str:
    trace, machine = data["trace"], data["machine"]
    calls = trace["num_calls"]
    units = {n: a["median_of_repeats"]["units_per_admit"] for n, a in data["allocators"].items()}
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}` (raw figures: `{data['raw_path']}`).",
            "",
            f"Machine: {machine['cpu_count']}-core {machine['machine']} sandbox, "
            f"{machine['cpu_model']}, {machine['platform']}, {machine['implementation']} "
            f"{machine['python']}, commit {machine['git_commit']}"
            + (" (avmp.memory edited since)" if machine["memory_tree_dirty"] else "")
            + f". The machine is {_load_word(machine)}shared with other work (1-minute load "
            f"average {machine['load_average_1min_at_start']:.1f} on {machine['cpu_count']} "
            "cores at the start), so each allocator replays the sequence "
            f"{data['warmup']} times to warm up and {data['repeats']} times timed, the "
            "allocators taking turns (round-robin) so that load bursts hit all alike; figures "
            "are the median over repeats of each repeat's median / p99.",
            "",
            f"Sequence: {trace['model']} at {trace['memory']}, {trace['num_requests']} requests "
            f"(prompt U{list(trace['prompt_tokens'])}, output U{list(trace['output_tokens'])}, "
            f"seed {trace['seed']}), at most {trace['max_running']} running; each step admits "
            "waiting requests, grows every running request by one token and frees finished "
            f"ones: {calls['admit']} admits, {calls['grow']} grows, {calls['free']} frees, "
            "identical for every allocator (none runs short).",
            "",
            *table(data),
            "",
            "Per call, in microseconds; `(Nx)` is the median's ratio to `unified`. "
            "`per unit allocated`: each allocating call's time (admits, and grows that added "
            "a unit) divided by the units it handed out; `admit, per unit`: the same for "
            "admits only. Units are pages and the slot for avmp, static and oracle; vLLM "
            f"blocks ({data['unified_block_size']}-token KV blocks and state blocks) for "
            "unified, so fewer, larger units (units per admit: "
            + ", ".join(f"{n} {u:.1f}" for n, u in units.items())
            + "). `grow +unit` counts only grows that allocated a page. Each call is timed "
            f"alone with `perf_counter_ns`, whose own cost ({data['timer_overhead_ns']:.0f} ns "
            "median) is included; gc stays enabled.",
            "",
        ]
    )


def write_docs(path: Path, section: str) -> None:
    """Replace this benchmark's section of docs/BENCHMARKS.md, keeping every other one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        rest = text[nxt + 1 :] if nxt >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")  # a blank line between
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocators", default=",".join(ALLOCATOR_NAMES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=None, help="rewrite this file's section")
    parser.add_argument("--from-json", action="store_true", help="redraw from --out, no run")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.allocator_calls " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--from-json"
    )
    if not args.from_json:
        names = [n.strip() for n in args.allocators.split(",") if n.strip()]
        data = run(TraceConfig(seed=args.seed), names, args.repeats, args.warmup)
        data["command"] = command.strip()
        data["raw_path"] = repo_path(args.out)
        write_result(args.out, data)
    data = read_result(args.out)
    print("\n".join(table(data)))
    if args.docs is not None:
        write_docs(args.docs, docs_section(data, data["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
