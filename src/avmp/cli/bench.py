"""``avmp bench``: the whole evaluation (paper grid + our workloads), its table and report.

Defaults (the "paper grid", widened as issue 3 asks): allocators avmp, unified, static
and oracle; the four paper presets and ours (`shift`, `longdoc_mix`, `longdoc_burst`,
`multi_turn`: `avmp.bench.workloads`); Jamba-1.5-Mini and two Mamba2 hybrids
(Granite-4.0-H-Tiny, Nemotron-H-8B); budgets 1/4/8/12 GiB; seeds 0-2; RTX 3060 and H100
time models. ``--quick`` runs a small grid (one model, two budgets, the H200 profile,
two seeds, short traces) as a smoke test of the whole path.

Cells whose weights + cache + activations exceed their GPU profile's memory are skipped
and listed (`avmp.sim.timing.check_feasible`): in the default grid every RTX 3060 cell
(none of the three models' weights fit in 12 GB) and Jamba-1.5-Mini on the H100 (96 GiB
of bf16 weights). ``--ignore-feasibility`` simulates them anyway, as runs before the
check did (the published figures' command says so).

``--prefix-cache`` adds prefix caching as one more axis of the grid (``off`` and/or the
placement policies ``avmp``, ``vllm-align``, ``sglang``, comma-separated); with it on,
the default workloads include the prefix workloads (`PREFIX_PRESETS`: multi-turn
conversations, synthetic and ShareGPT's, agent loops, few-shot prompts, vllm#45238's
shape), whose prompts name
what they share, and the report adds a table of hits against the ideal.
``--prefix-host-level`` keeps the checkpoints the caches evict in the host tier, in
every layout with one (recorded in the cells' settings). ``--overlap`` plans each step
while the previous one runs, as avmp's engine does (`SimConfig.overlap`; recorded too).

``--trace FILE`` (repeatable) adds a trace file as one more workload, named after the
file, beside the ``--workloads`` presets or alone (`avmp.bench.trace_workloads`; read as
``avmp replay`` reads one: ``--trace-format``, ``--time-unit``, ``--max-requests N``, the
first N, and 48 under ``--quick``). Replayed as recorded, a trace is one cell per model,
budget, profile and layout (seed 0); ``--arrival`` re-times it per seed.

``avmp bench serve --url URL`` instead loads a running OpenAI-compatible server (avmp,
vLLM, SGLang) and reports its latencies and throughput per request rate
(`avmp.bench.loadgen`).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from avmp.cli import UserError, parse_budget
from avmp.cli.options import (
    add_feasibility_option,
    add_policy_options,
    add_ssm_dtype_option,
    add_static_options_option,
    count_option,
    policy_options,
    ssm_dtype_choice,
    static_options,
)

DEFAULT_MODELS = ("jamba-1.5-mini", "granite-4.0-h-tiny", "nemotron-h-8b")
DEFAULT_BUDGETS = ("1GiB", "4GiB", "8GiB", "12GiB")
DEFAULT_PROFILES = ("rtx3060", "h100")
DEFAULT_SEEDS = 3
QUICK_REQUESTS = 48
QUICK_PROFILES = ("h200",)  # Jamba-1.5-Mini's 96 GiB of weights fit in 141 GB, not in 80
MAX_SEEDS = 1000


def _csv(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def add_parser(subparsers: Any) -> None:
    from avmp.bench.workloads import ARRIVAL_FORMS, PREFIX_PRESETS, PRESETS
    from avmp.cli.replay import add_slo_arguments
    from avmp.sched.prefix import PREFIX_CACHE_CHOICES

    parser = subparsers.add_parser(
        "bench",
        help="run the whole evaluation and write its report",
        description="Run the whole evaluation: allocators avmp, unified, static and oracle under "
        "one preemption policy (--preemption, --admission, --host-tier), and unified and "
        "static as vLLM and SGLang ship them (unified-shipped, static-shipped), on the "
        "four paper workloads and ours (shift, longdoc_mix, longdoc_burst, multi_turn) or "
        "your own trace files (--trace), three "
        "hybrid models, 1/4/8/12 GiB, RTX 3060 and H100 "
        "time models, 3 seeds; print AVMP's throughput ratios with 95% CIs and write "
        "OUT/report.md and OUT/report.html. Finished cells are kept: a rerun resumes. "
        "`avmp bench serve --url URL` measures a running OpenAI-compatible server instead.",
    )
    parser.add_argument(
        "--out", default="avmp-results", help="results directory (default: avmp-results)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small grid: 1 model, 1 and 8 GiB, H200, 2 seeds, 48 requests per trace",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="local worker processes (default: 2)",
    )
    parser.add_argument("--ray", metavar="ADDRESS", help="run the cells on a Ray cluster")
    parser.add_argument("--calibration", metavar="FILE", help="step-time calibration JSON")
    parser.add_argument("--models", type=_csv, help="comma-separated zoo models")
    parser.add_argument("--budgets", type=_csv, help="comma-separated memory budgets, e.g. 4GiB")
    parser.add_argument(
        "--workloads",
        type=_csv,
        help=f"comma-separated workload presets (default: all of {', '.join(PRESETS)}; "
        f"with --prefix-cache on, also the prefix workloads {', '.join(PREFIX_PRESETS)}; "
        "none with --trace)",
    )
    parser.add_argument(
        "--prefix-cache",
        type=_csv,
        default=("off",),
        metavar="POLICIES",
        help="comma-separated prefix caches, one grid axis: off (default), avmp "
        "(checkpoints at output ends and branch points), vllm-align (vLLM's block-aligned "
        "states), sglang (every 64/256 tokens); any of "
        f"{', '.join(PREFIX_CACHE_CHOICES)}",
    )
    parser.add_argument(
        "--prefix-host-level",
        action="store_true",
        help="the prefix caches keep the checkpoints they evict in the host tier "
        "(--host-tier) as a second level, in every layout with a host tier (the peers as "
        "shipped have none); needs --prefix-cache and the host tier (not --preemption "
        "recompute, not --host-tier 0); recorded in the cells' settings",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="plan each step while the previous one runs, as avmp's engine, SGLang's "
        "overlap scheduler and vLLM's async scheduling do: a request arriving mid-step "
        "waits one step more for its first token; recorded in the cells' settings",
    )
    parser.add_argument("--profiles", type=_csv, help="comma-separated GPU profiles")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--sharegpt-rules", choices=("paper", "vllm"), default="paper")
    parser.add_argument(
        "--arrival",
        metavar="PROCESS",
        help=f"arrivals for every workload instead of the presets' own: {ARRIVAL_FORMS} "
        "(RATE in requests/s; a workload keeps its lengths)",
    )
    add_trace_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ssm_dtype_option(parser)
    add_static_options_option(parser)
    add_feasibility_option(parser)
    add_policy_options(parser)
    add_slo_arguments(parser)
    parser.set_defaults(run=run)
    # `avmp bench` alone runs the evaluation above; `avmp bench serve` loads a server
    subcommands = parser.add_subparsers(dest="bench_command", metavar="{serve}", required=False)
    from avmp.cli.bench_serve import add_serve_parser

    add_serve_parser(subcommands)


def add_trace_options(parser: Any) -> None:
    """``--trace FILE`` (repeatable) and how to read the files: ``--trace-format``,
    ``--time-unit`` (as ``avmp replay`` takes them) and ``--max-requests``."""
    from avmp.cli.replay import add_trace_format_options

    parser.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        help="a trace file (any that avmp replay reads) as one more workload, named after the "
        "file (chat.jsonl.gz: chat), beside --workloads or alone; repeat for more. Replayed "
        "as recorded: one cell per model, budget, profile and layout, seed 0; with --arrival, "
        "re-timed per seed. Prefix sharing the file names (JSONL segments, Mooncake hash_ids) "
        "reaches --prefix-cache",
    )
    add_trace_format_options(parser, "--trace-format")
    parser.add_argument(
        "--max-requests",
        metavar="N",
        help=f"replay the first N requests of each --trace by arrival (default: all; "
        f"{QUICK_REQUESTS} under --quick)",
    )


def build_grid(args: argparse.Namespace) -> Any:
    """The sweep grid the arguments ask for (defaults, or the quick grid)."""
    from avmp.bench.sweep import SweepGrid

    quick = bool(args.quick)
    models = args.models or (DEFAULT_MODELS[:1] if quick else DEFAULT_MODELS)
    budgets = args.budgets or (("1GiB", "8GiB") if quick else DEFAULT_BUDGETS)
    profiles = args.profiles or (QUICK_PROFILES if quick else DEFAULT_PROFILES)
    num_seeds = args.seeds if args.seeds is not None else (2 if quick else DEFAULT_SEEDS)
    if not 1 <= num_seeds <= MAX_SEEDS:
        raise UserError(f"--seeds must be between 1 and {MAX_SEEDS}, got {num_seeds}")
    _check_workers(args.workers)
    prefix_caches = _prefix_caches(args.prefix_cache)
    if args.prefix_host_level:
        _check_prefix_host_level(prefix_caches, args)
    workloads = args.workloads or (() if args.trace else _default_workloads(prefix_caches))
    num_requests = tuple((w, QUICK_REQUESTS) for w in workloads) if quick else ()
    if args.calibration is not None:
        if not os.path.exists(args.calibration):
            raise FileNotFoundError(f"no such calibration file: {args.calibration}")
        from avmp.sim.calibration import load_calibration

        load_calibration(args.calibration)  # a bad file: one line before any cell is made
    for model in models:
        _check_model(model)
    traces = _trace_workloads(args)  # last: a trace file may take a while to read
    return SweepGrid(
        workloads=tuple(workloads),
        models=tuple(models),
        budgets_bytes=tuple(parse_budget("--budgets", b) for b in budgets),
        profiles=tuple(profiles),
        seeds=tuple(range(num_seeds)),
        num_requests=num_requests,
        sharegpt_rules=args.sharegpt_rules,
        arrival=args.arrival,
        calibration=args.calibration,
        ssm_dtype=ssm_dtype_choice(args.ssm_dtype),
        static_options=static_options(args.static_options),
        ignore_feasibility=bool(args.ignore_feasibility),
        prefix_caches=prefix_caches,
        prefix_host_level=bool(args.prefix_host_level),
        traces=traces,
        overlap=bool(args.overlap),
        **policy_options(args),
    )


def _trace_workloads(args: argparse.Namespace) -> tuple[Any, ...]:
    """The ``--trace`` files as workloads: every file checked to exist and open, and
    their names checked, before any is read (each error one line)."""
    from avmp.bench.trace_workloads import (
        check_trace_names,
        read_trace_workload,
        trace_workload_name,
    )

    paths = args.trace or []
    max_requests = _max_requests(args.max_requests)
    if not paths:
        options = {"--trace-format": args.trace_format, "--time-unit": args.time_unit,
                   "--max-requests": args.max_requests}  # fmt: skip
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            raise UserError(f"{given[0]} says how to read --trace files; give --trace FILE")
        return ()
    for path in paths:
        _check_readable(path)
    check_trace_names([(trace_workload_name(p), p) for p in paths])
    if max_requests is None and args.quick:
        max_requests = QUICK_REQUESTS
    return tuple(
        read_trace_workload(p, args.trace_format, args.time_unit, max_requests) for p in paths
    )


def _max_requests(text: str | None) -> int | None:
    """``--max-requests``: a whole number >= 1 (None: not given)."""
    return count_option("--max-requests", text)


def _check_readable(path: str) -> None:
    """A one-line error for a trace file that is missing, a directory or unreadable."""
    if os.path.isdir(path):
        raise UserError(f"--trace {path}: is a directory, not a trace file")
    if not os.path.exists(path):
        raise UserError(f"--trace {path}: no such file")
    if not os.path.isfile(path):  # a pipe or a device: a trace file is read more than once
        raise UserError(f"--trace {path}: not a regular file; save the trace to a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UserError(f"--trace {path}: {error.strerror or error}") from None


def _prefix_caches(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--prefix-cache``'s policies, each known and named once."""
    from avmp.sched.prefix import PREFIX_CACHE_CHOICES

    unknown = [v for v in values if v not in PREFIX_CACHE_CHOICES]
    if unknown:
        raise UserError(
            f"--prefix-cache: unknown {unknown[0]!r}; known: {', '.join(PREFIX_CACHE_CHOICES)}"
        )
    return tuple(dict.fromkeys(values))


def _check_prefix_host_level(prefix_caches: tuple[str, ...], args: argparse.Namespace) -> None:
    """``--prefix-host-level`` with a cache on and a host tier, else one line naming
    the options (`avmp.cli.generate.check_prefix_host_level`)."""
    from avmp.cli.generate import check_prefix_host_level

    on = [c for c in prefix_caches if c != "off"]
    policy = policy_options(args)
    check_prefix_host_level(on[0] if on else "off", policy["preemption"], policy["host_tier_bytes"])


def _default_workloads(prefix_caches: tuple[str, ...]) -> tuple[str, ...]:
    """Every preset; with a prefix cache on, the prefix workloads too (the presets
    name no shared content, so a cache finds nothing in them)."""
    from avmp.bench.workloads import PREFIX_PRESETS, PRESETS

    if any(c != "off" for c in prefix_caches):
        return (*PRESETS, *PREFIX_PRESETS)
    return tuple(PRESETS)


def _check_workers(workers: int) -> None:
    """Local worker processes: at least one, and not so many that spawning them (each
    imports numpy and the simulator) swamps the machine."""
    most = 4 * (os.cpu_count() or 1)
    if not 1 <= workers <= most:
        raise UserError(f"--workers must be between 1 and {most} (4 per CPU), got {workers}")


def _check_model(name: str) -> None:
    """Fail before any work on a model the zoo does not know (ConfigError, one line)."""
    from avmp.models.zoo import resolve_model

    resolve_model(name)


def record_run(
    args: argparse.Namespace, grid: Any, num_simulated: int, elapsed_s: float, num_reruns: int = 0
) -> None:
    """Append how this invocation ran to ``DIR/runs.jsonl`` (the conditions that
    docs/BENCHMARKS.md states beside the table: machine, workers, wall time)."""
    import json
    import platform
    import sys
    from datetime import UTC, datetime

    from avmp.bench.files import naming

    entry = {
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": ["avmp", "bench", *(sys.argv[2:] if sys.argv[1:2] == ["bench"] else [])],
        "quick": bool(args.quick),
        "workers": args.workers,
        "ray": args.ray,
        "num_cells": len(grid.cells()),
        "num_simulated": num_simulated,
        "num_reruns": num_reruns,
        "skipped_infeasible": [
            {"model": m, "budget_bytes": b, "profile": p} for m, b, p, _ in grid.skipped_cells()
        ],
        "traces": [
            {"name": t.name, "num_requests": len(t.requests), **t.source()} for t in grid.traces
        ],
        "elapsed_s": round(elapsed_s, 1),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, {_cpu_model()}",
        "python": platform.python_version(),
    }
    path = os.path.join(args.out, "runs.jsonl")
    with naming(path), open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(args: argparse.Namespace) -> int:
    from avmp.bench.report import (
        has_prefix_cache,
        headline_table,
        markdown_table,
        prefix_table,
        write_report,
    )
    from avmp.bench.stats import load_cells
    from avmp.bench.sweep import run_sweep
    from avmp.cli.replay import slo_targets

    slo = slo_targets(args)  # a bad objective fails before any work
    if not args.out.strip():  # --out "$UNSET": not the working directory, unasked
        raise UserError("--out is empty; give a results directory, e.g. --out avmp-results")
    grid = build_grid(args)
    skipped = grid.skipped_cells()
    if not grid.cells():
        raise UserError(
            f"every cell is infeasible: {skipped[0][3]}; use a larger GPU profile, "
            "a smaller budget, or --ignore-feasibility"
        )
    for trace in grid.traces:
        print(_trace_header(trace, grid))
    started = time.monotonic()
    num_simulated = run_sweep(
        grid, args.out, workers=args.workers, ray_address=args.ray, progress=not args.no_progress
    )
    elapsed = time.monotonic() - started
    cells = load_cells(args.out)
    reruns = sum("same_work" in c for c in cells)
    record_run(args, grid, num_simulated, elapsed, reruns)
    md_path, html_path = write_report(args.out, slo)
    print(markdown_table(headline_table(cells, slo)))
    if has_prefix_cache(cells):
        print("\nprefix caching:\n" + markdown_table(prefix_table(cells)))
    rerun_text = f" and {reruns} reruns on the requests every layout completed" if reruns else ""
    print(
        f"\n{len(grid.cells())} cells{rerun_text} ({num_simulated} simulated now, "
        f"{elapsed:.0f} s); report: {md_path}, {html_path}"
    )
    if skipped:
        print(_skipped_note(grid, skipped))
    return 0


def _trace_header(trace: Any, grid: Any) -> str:
    """What was read of a ``--trace`` file, as ``avmp replay``'s header says it."""
    from avmp.bench.report import trace_source_text

    text = f"trace {trace.name}: {len(trace.requests)} requests "
    text += trace_source_text(trace.source(), len(trace.requests))
    if trace.read_as:
        text += f"; {trace.read_as}"
    if any(c != "off" for c in grid.prefix_caches) and not trace.shares_prefixes():
        text += "; its prompts name no shared content, so a prefix cache finds none in it"
    return text


def _skipped_note(grid: Any, skipped: list[tuple[str, int, str, str]]) -> str:
    """Which (model, budget, profile) cells were left out as infeasible, and why."""
    from avmp.units import format_bytes

    num_traces = sum(len(grid.seeds_for(w)) for w in grid.workload_names)  # (workload, seed)
    per_combination = num_traces * len(grid.allocators) * len(grid.prefix_caches)
    names = ", ".join(f"{m} {format_bytes(b)} {p}" for m, b, p, _ in skipped)
    return (
        f"skipped {len(skipped) * per_combination} infeasible cells "
        f"({len(skipped)} model/budget/profile combinations: {names}); e.g. {skipped[0][3]}; "
        "--ignore-feasibility simulates them"
    )


# -- avmp bench serve ------------------------------------------------------------------
