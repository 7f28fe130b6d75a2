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
every layout with one (recorded in the cells' settings).

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
        "four paper workloads and ours (shift, longdoc_mix, longdoc_burst, multi_turn), three "
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
        f"with --prefix-cache on, also the prefix workloads {', '.join(PREFIX_PRESETS)})",
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
    parser.add_argument("--profiles", type=_csv, help="comma-separated GPU profiles")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--sharegpt-rules", choices=("paper", "vllm"), default="paper")
    parser.add_argument(
        "--arrival",
        metavar="PROCESS",
        help=f"arrivals for every workload instead of the presets' own: {ARRIVAL_FORMS} "
        "(RATE in requests/s; a workload keeps its lengths)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ssm_dtype_option(parser)
    add_static_options_option(parser)
    add_feasibility_option(parser)
    add_policy_options(parser)
    add_slo_arguments(parser)
    parser.set_defaults(run=run)
    # `avmp bench` alone runs the evaluation above; `avmp bench serve` loads a server
    subcommands = parser.add_subparsers(dest="bench_command", metavar="{serve}", required=False)
    add_serve_parser(subcommands)


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
    workloads = args.workloads or _default_workloads(prefix_caches)
    num_requests = tuple((w, QUICK_REQUESTS) for w in workloads) if quick else ()
    if args.calibration is not None and not os.path.isfile(args.calibration):
        raise FileNotFoundError(f"no such calibration file: {args.calibration}")
    for model in models:
        _check_model(model)
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
        **policy_options(args),
    )


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
    grid = build_grid(args)
    skipped = grid.skipped_cells()
    if not grid.cells():
        raise UserError(
            f"every cell is infeasible: {skipped[0][3]}; use a larger GPU profile, "
            "a smaller budget, or --ignore-feasibility"
        )
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


def _skipped_note(grid: Any, skipped: list[tuple[str, int, str, str]]) -> str:
    """Which (model, budget, profile) cells were left out as infeasible, and why."""
    from avmp.units import format_bytes

    per_combination = (len(grid.workloads) * len(grid.seeds) * len(grid.allocators)
                       * len(grid.prefix_caches))  # fmt: skip
    names = ", ".join(f"{m} {format_bytes(b)} {p}" for m, b, p, _ in skipped)
    return (
        f"skipped {len(skipped) * per_combination} infeasible cells "
        f"({len(skipped)} model/budget/profile combinations: {names}); e.g. {skipped[0][3]}; "
        "--ignore-feasibility simulates them"
    )


# -- avmp bench serve ------------------------------------------------------------------

SERVE_DEFAULT_PROMPTS = 1000  # vLLM's bench serve default for ShareGPT


def add_serve_parser(subcommands: Any) -> None:
    from avmp.bench.loadgen import DEFAULT_PERCENTILES, ENDPOINTS
    from avmp.bench.workloads import PRESETS
    from avmp.cli.replay import add_trace_format_options

    parser = subcommands.add_parser(
        "serve",
        help="load an OpenAI-compatible server and measure its latencies",
        description="Send streamed requests to an OpenAI-compatible server (avmp serve, vLLM, "
        "SGLang) at one or more request rates and report TTFT, TPOT, ITL and end-to-end "
        "latency percentiles, throughput and goodput per rate. Prompts: ShareGPT first turns "
        "as text with the reply's length as max_tokens (default), or the lengths of a trace "
        "file or a workload preset as token-id prompts of exactly that length. A trace can "
        "also set the timing (--request-rate trace).",
    )
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--endpoint",
        choices=tuple(ENDPOINTS),
        default="completions",
        help="/v1/completions (default) or /v1/chat/completions",
    )
    parser.add_argument("--model", help="model name sent (default: the first of /v1/models)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--trace",
        metavar="FILE",
        help="prompt/output lengths (and with --request-rate trace, arrival times) of a "
        "trace file: JSONL or a JSON array, a CSV or TSV whose header names them, Azure, "
        "BurstGPT or Mooncake, also .gz, .bz2 or .xz",
    )
    source.add_argument(
        "--workload", choices=tuple(PRESETS), help="prompt/output lengths of a workload preset"
    )
    add_trace_format_options(parser, "--trace-format")
    parser.add_argument(
        "--tokenizer",
        metavar="NAME_OR_DIR",
        help="with --trace or --workload: send text of each length under this tokenizer "
        "(a transformers tokenizer directory or model id) instead of token ids; a trace's "
        "prefix sharing is sent with token ids only",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        help=f"requests per rate (default: {SERVE_DEFAULT_PROMPTS} ShareGPT "
        "conversations, a whole trace, a preset's size)",
    )
    parser.add_argument("--seed", type=int, default=0, help="requests and arrivals (default 0)")
    parser.add_argument(
        "--request-rate",
        default="inf",
        metavar="RATES",
        help="comma-separated requests/s, one run each; inf sends all at once; trace sends "
        "each request at its --trace arrival time (default: inf)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        metavar="F",
        help="with --request-rate trace: arrival times multiplied by F (0.5: twice as fast, "
        "2: half as fast; default 1)",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps: 1 Poisson (default), < 1 burstier",
    )
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    parser.add_argument(
        "--warmup", type=int, default=1, help="requests sent first and not counted (default 1)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="one request's bound in seconds (default 600)",
    )
    parser.add_argument(
        "--max-duration",
        type=float,
        metavar="S",
        help="each rate's bound in seconds; unfinished requests count failed",
    )
    parser.add_argument(
        "--percentiles",
        default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES),
        help="comma-separated latency percentiles (default: 50,90,95,99)",
    )
    parser.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        help="objectives of goodput, e.g. ttft:500 tpot:50 (e2e:MS too)",
    )
    parser.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (outputs may end before max_tokens)",
    )
    parser.add_argument("--out", metavar="FILE.json", help="save every request's timings here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_serve)


def parse_rates(text: str) -> list[float]:
    """``1,4,16,inf`` as request rates (requests/s > 0, or inf)."""
    import math

    rates = []
    for item in (t.strip() for t in text.split(",")):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not rate > 0:
            raise UserError(f"--request-rate: {item!r} is not a rate > 0 or inf")
        rates.append(rate)
    return rates


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``50,90,99.9``: percentiles in (0, 100]."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--percentiles: expected numbers such as 50,90,99, got {text!r}") from None
    if not all(0 < p <= 100 for p in values):
        raise UserError(f"--percentiles: each must be in (0, 100], got {text!r}")
    return values


def _check_serve_numbers(args: argparse.Namespace) -> None:
    checks = (
        (args.num_prompts is None or args.num_prompts >= 1, "--num-prompts", ">= 1"),
        (args.warmup >= 0, "--warmup", ">= 0"),
        (args.max_concurrency is None or args.max_concurrency >= 1, "--max-concurrency", ">= 1"),
        (0 < args.request_timeout < float("inf"), "--request-timeout", "a positive number"),
        (
            args.max_duration is None or 0 < args.max_duration < float("inf"),
            "--max-duration",
            "a positive number",
        ),
        (0 < args.burstiness < float("inf"), "--burstiness", "a positive number"),
    )
    for good, flag, wanted in checks:
        if not good:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UserError(f"{flag} must be {wanted}, got {value}")


def serve_requests(args: argparse.Namespace) -> tuple[list[Any], str]:
    """The requests of one rate, and a name for where they come from."""
    from avmp.bench import loadgen

    if args.tokenizer and not (args.trace or args.workload):
        raise UserError("--tokenizer goes with --trace or --workload (ShareGPT is text already)")
    tokenizer = loadgen.load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.trace:
        built, source = _trace_requests(args, tokenizer)
    elif args.workload:
        built = loadgen.preset_requests(args.workload, args.num_prompts, args.seed, tokenizer)
        source = f"workload {args.workload}"
    else:
        num = args.num_prompts or SERVE_DEFAULT_PROMPTS
        built = loadgen.sharegpt_requests(num, args.seed)
        source = "ShareGPT (vLLM rules)"
    if args.endpoint == "chat" and not isinstance(built[0].prompt, str):
        raise UserError(
            "--endpoint chat needs text prompts: ShareGPT (no --trace/--workload) or --tokenizer"
        )
    return built, source


def _trace_requests(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], str]:
    """The ``--trace`` file's requests, and what to call them: the file, and how it was
    read where its columns were found by name (`avmp.cli.replay.trace_read_as`)."""
    from avmp.bench import loadgen
    from avmp.bench.traces import read_trace_part
    from avmp.cli.replay import trace_read_as

    part = read_trace_part(args.trace, args.trace_format, time_unit=args.time_unit)
    if part.columns is not None and part.columns.arrival is None and trace_time_scale(args):
        raise UserError(
            f"{args.trace}: --request-rate trace sends each request at its arrival time, and "
            "this trace has none; give a rate, or add a column of times (arrival_s, timestamp)"
        )
    built = loadgen.spec_requests(part.requests[: args.num_prompts], args.seed, tokenizer)
    read_as = trace_read_as(part)
    return built, f"trace {args.trace}" + (f" ({read_as})" if read_as else "")


def trace_time_scale(args: argparse.Namespace) -> float | None:
    """The time scale of ``--request-rate trace`` (the trace's own timing), or None when
    the rates are numbers; one-line errors for what cannot go with it."""
    import math

    from avmp.bench.loadgen import TRACE_RATE

    items = [t.strip() for t in args.request_rate.split(",")]
    if TRACE_RATE not in items:
        if args.time_scale is not None:
            raise UserError("--time-scale goes with --request-rate trace")
        return None
    if len(items) > 1:
        raise UserError(
            "--request-rate trace replays the trace's own timing: it cannot be mixed with rates"
        )
    if not args.trace:
        raise UserError("--request-rate trace needs --trace FILE (its arrival times are sent)")
    if args.burstiness != 1.0:
        raise UserError("--burstiness shapes a rate's gaps: --request-rate trace has none")
    scale = 1.0 if args.time_scale is None else args.time_scale
    if not 0 < scale < math.inf:
        raise UserError(f"--time-scale must be a positive number, got {scale}")
    return scale


def run_serve(args: argparse.Namespace) -> int:
    import math
    import sys

    from avmp.bench import loadgen

    time_scale = trace_time_scale(args)
    rates = parse_rates(args.request_rate) if time_scale is None else [math.inf]
    percentiles = parse_percentiles(args.percentiles)
    goodput = loadgen.parse_goodput(args.goodput) if args.goodput else None
    _check_serve_numbers(args)
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UserError("avmp bench serve needs httpx: pip install 'avmp[serve]'") from None
    base_url = loadgen.normalize_url(args.url)
    model = args.model or loadgen.fetch_model(base_url, args.api_key)
    requests, source = serve_requests(args)
    configs = [_load_config(args, base_url, model, rate, time_scale) for rate in rates]
    warmup = [requests[i % len(requests)] for i in range(args.warmup)]
    loadgen.warm_up(warmup, configs[0])
    entries = [_run_rate(requests, config, percentiles, goodput, args) for config in configs]
    result = _serve_result(args, base_url, model, source, len(requests), percentiles, entries)
    if args.out:
        loadgen.save_result(args.out, result)
    from avmp.bench.serve_report import print_tables

    print_tables(result)
    if args.out:
        print(f"saved: {args.out} (avmp report {args.out} draws the latency distributions)")
    if not any(entry["summary"]["completed"] for entry in entries):
        print("avmp bench serve: no request completed", file=sys.stderr)
        return 1
    return 0


def _load_config(
    args: argparse.Namespace, base_url: str, model: str, rate: float, time_scale: float | None
) -> Any:
    from avmp.bench.loadgen import LoadConfig

    return LoadConfig(
        base_url=base_url,
        model=model,
        endpoint=args.endpoint,
        request_rate=rate,
        time_scale=time_scale,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=not args.no_ignore_eos,
        request_timeout_s=args.request_timeout,
        max_duration_s=args.max_duration,
        seed=args.seed,
        api_key=args.api_key,
    )


def _run_rate(
    requests: list[Any],
    config: Any,
    percentiles: tuple[float, ...],
    goodput: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Load the server at one rate with a progress bar; that rate's result entry."""
    from rich.progress import Progress

    from avmp.bench.loadgen import load_label, rate_result, run_load

    with Progress(transient=True, disable=args.no_progress) as bar:
        task = bar.add_task(f"rate {load_label(config)}", total=len(requests))
        records, duration = run_load(requests, config, lambda: bar.advance(task))
    return rate_result(config, records, duration, percentiles, goodput)


def _serve_result(
    args: argparse.Namespace,
    base_url: str,
    model: str,
    source: str,
    num_prompts: int,
    percentiles: tuple[float, ...],
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The saved result: how it was run (command, server, model, date) and each rate."""
    import sys
    from datetime import UTC, datetime

    from avmp.bench.loadgen import RESULT_SCHEMA

    argv = _redacted(sys.argv[1:]) if sys.argv[1:3] == ["bench", "serve"] else None
    return {
        "schema": RESULT_SCHEMA,
        "argv": ["avmp", *argv] if argv else None,
        "url": base_url,
        "model": model,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "endpoint": args.endpoint,
            "dataset": source,
            "num_prompts": num_prompts,
            "seed": args.seed,
            "warmup": args.warmup,
            "ignore_eos": not args.no_ignore_eos,
            "request_timeout_s": args.request_timeout,
            "max_duration_s": args.max_duration,
            "percentiles": list(percentiles),
            "goodput": args.goodput,
        },
        "results": entries,
    }


def _redacted(argv: list[str]) -> list[str]:
    """The command line with the API key's value hidden (results get shared)."""
    out = list(argv)
    for i, item in enumerate(out):
        if item == "--api-key" and i + 1 < len(out):
            out[i + 1] = "***"
        elif item.startswith("--api-key="):
            out[i] = "--api-key=***"
    return out
