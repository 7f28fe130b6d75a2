"""``avmp replay TRACE``: replay one trace file with every allocator and compare them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from avmp.units import format_bytes

if TYPE_CHECKING:
    from avmp.bench.traces import TracePart, TraceWindow
    from avmp.models.geometry import ModelGeometry

COLUMNS = (
    "allocator",
    "completed",
    "rejected",
    "req/s",
    "out tok/s",
    "vs avmp",
    "req/s, all completed",
    "vs avmp, all completed",
    "req/s, same requests",
    "vs avmp, same requests",
    "goodput req/s",
    "OOM events",
    "preempted (swapped)",
    "TTFT p50/p99 s",
    "TPOT p50/p99 ms",
    "makespan s",
)


def add_parser(subparsers: Any) -> None:
    from avmp.bench.sweep import LAYOUTS, PROFILES
    from avmp.sim.simulator import SimConfig

    parser = subparsers.add_parser(
        "replay",
        help="replay a trace file with every allocator",
        description="Replay one trace (JSONL or a JSON array, a CSV or TSV whose header names "
        "the arrival time, prompt and output tokens, Azure LLM inference CSV, BurstGPT CSV or "
        "Mooncake JSONL; any of them may be .gz, .bz2 or .xz) through the simulator with "
        "each allocator, on the same requests.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace file (.gz, .bz2, .xz read as is)")
    parser.add_argument(
        "--model",
        required=True,
        help="zoo name (e.g. jamba-1.5-mini), a config.json path or a checkpoint directory "
        "holding one, as avmp plan takes",
    )
    parser.add_argument("--memory", required=True, help="cache memory budget, e.g. 12GiB")
    add_trace_format_options(parser, "--format")
    parser.add_argument("--profile", choices=PROFILES, default="h100", help="GPU time model")
    parser.add_argument(
        "--allocators",
        default=",".join(LAYOUTS),
        help="comma-separated allocators; unified-shipped and static-shipped run vLLM's "
        "and SGLang's own preemption and admission (default: all)",
    )
    parser.add_argument("--calibration", metavar="FILE", help="step-time calibration JSON")
    parser.add_argument(
        "--charge-captures", action="store_true",
        help="with --calibration: charge a CUDA graph capture whenever a step meets a new "
             "bucket (an engine that did not warm up); default: a warmed-up server's steps",
    )  # fmt: skip
    parser.add_argument(
        "--overlap", action="store_true",
        help="plan each step while the previous one runs, as avmp's engine, SGLang's "
             "overlap scheduler and vLLM's async scheduling do: a request arriving mid-step "
             "waits one step more for its first token (default: plans between steps)",
    )  # fmt: skip
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=SimConfig.max_num_seqs,
        metavar="N",
        help=f"running requests at most, as vLLM's (default {SimConfig.max_num_seqs})",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=SimConfig.max_num_batched_tokens,
        metavar="N",
        help="tokens per step at most, the chunked-prefill budget, as vLLM's "
        f"(default {SimConfig.max_num_batched_tokens})",
    )
    parser.add_argument(
        "--tensor-parallel",
        default=None,
        metavar="N",
        help="split the model over N GPUs of one host (1-8): every allocator holds one "
        "rank's units in --memory (each GPU's cache), the roofline adds the all-reduces "
        "over the profile's NVLink",
    )
    parser.add_argument(
        "--start",
        metavar="S",
        help="replay only the requests arriving S seconds or more after the trace's first, "
        "their arrivals re-based to start at 0 (default 0)",
    )
    parser.add_argument(
        "--duration",
        metavar="D",
        help="... and less than S + D seconds after it (default: to the trace's end)",
    )
    parser.add_argument(
        "--max-requests",
        metavar="N",
        help="replay only the first N requests by arrival (of the --start/--duration window "
        "when given); default: all",
    )
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument(
        "--workers",
        default=None,
        metavar="N",
        help="allocators replayed at once, in processes (default: one per allocator up to "
        "the CPUs, for traces of 2,000 requests or more; else 1); the results do not "
        "depend on it",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (shown on a terminal's stderr, one per allocator)",
    )
    add_ssm_dtype_option(parser)
    add_static_options_option(parser)
    add_feasibility_option(parser)
    add_policy_options(parser)
    add_slo_arguments(parser)
    add_prefix_cache_option(parser)
    parser.set_defaults(run=run)


def add_trace_format_options(parser: Any, format_flag: str) -> None:
    """``format_flag`` (the trace's format) and ``--time-unit`` (of its numeric times),
    shared with ``avmp bench serve``."""
    from avmp.bench.traces import FORMATS, TIME_UNITS

    parser.add_argument(format_flag, choices=FORMATS, help="trace format (default: guessed)")
    parser.add_argument(
        "--time-unit",
        choices=tuple(TIME_UNITS),
        help="unit of the trace's numeric arrival times where the column's name gives none "
        "(timestamp, time, ts; not arrival_s or timestamp_ms): default seconds, Mooncake's "
        "milliseconds; dates and times (ISO 8601) are read as such",
    )


def add_prefix_cache_option(parser: Any) -> None:
    """``--prefix-cache``: off (default, results as before) or a checkpoint placement
    policy of the prefix cache (`avmp.sched.prefix`)."""
    from avmp.sched.prefix import PREFIX_CACHE_CHOICES

    parser.add_argument(
        "--prefix-cache",
        choices=PREFIX_CACHE_CHOICES,
        default="off",
        help="prefix caching: avmp (checkpoints at output ends and branch points, a "
        "prompt's first segment end and prefill chunk ends in idle memory, evicted by FLOPs "
        "saved per byte and by how often each rule is resumed from), vllm-align (vLLM's "
        "block-aligned states) or sglang (SGLang's every 64/256 tokens); requests share "
        "prefixes only where the trace "
        "names their content (default: off)",
    )
    parser.add_argument(
        "--prefix-host-level",
        action="store_true",
        help="with --prefix-cache: keep the checkpoints the prefix cache evicts in the host "
        "tier (--host-tier) as a second level, copies charged at the profile's host link; "
        "needs the host tier (not --preemption recompute, not --host-tier 0); the peers as "
        "shipped (unified-shipped, static-shipped) have no host tier and run without it",
    )


def add_slo_arguments(parser: Any) -> None:
    """The latency objectives of goodput (shared with ``avmp bench``)."""
    from avmp.sim.metrics import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_S

    parser.add_argument(
        "--slo-ttft-s",
        type=float,
        default=DEFAULT_SLO_TTFT_S,
        metavar="S",
        help="goodput counts requests whose first token came within S seconds "
        f"(default: {DEFAULT_SLO_TTFT_S:g})",
    )
    parser.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=DEFAULT_SLO_TPOT_MS,
        metavar="MS",
        help="... and whose mean time per output token after the first was at most MS "
        f"milliseconds (default: {DEFAULT_SLO_TPOT_MS:g}, i.e. 10 tokens/s)",
    )


def slo_targets(args: argparse.Namespace) -> Any:
    """The objectives the options ask for (ValueError, one line, when not positive)."""
    from avmp.sim.metrics import SloTargets

    return SloTargets(ttft_s=args.slo_ttft_s, tpot_ms=args.slo_tpot_ms)


def replay(args: argparse.Namespace) -> tuple[list[dict[str, Any]], TracePart]:
    """Run the trace (the part its options take) once per allocator; returns each
    allocator's result dict, with ``goodput`` under the options' objectives,
    ``common_request_throughput`` (req/s over the requests every allocator completed)
    and ``same_work_request_throughput`` (req/s replayed on only those requests, where
    the allocators completed different ones: `rerun_on_common`) added, and the part of
    the trace replayed.

    Raises:
        UserError: a bad argument, or a trace none of whose requests fits in the
            budget with any allocator (every row would say 0 completed).
    """
    from avmp.bench.traces import read_trace_part
    from avmp.sim.metrics import common_request_ids, common_throughput, goodput

    budget = parse_budget("--memory", args.memory)
    slo = slo_targets(args)
    window = trace_window(args)
    geometry, tasks = _replay_tasks(args, budget)
    workers = _workers(getattr(args, "workers", None), len(tasks))
    part = read_trace_part(args.trace, args.format, window, getattr(args, "time_unit", None))
    inputs = ReplayInputs(part.requests, geometry, budget)
    with replay_progress(getattr(args, "no_progress", False)) as bar:
        results = _run_with_bars(bar, tasks, inputs, workers, "")
        _check_some_completed(args.trace, results, inputs)
        same_work = rerun_on_common(tasks, inputs, results, workers, bar)
    common = common_request_ids(results) or set()
    for result, same in zip(results, same_work, strict=True):
        result["goodput"] = goodput(result, slo)
        result["common_request_throughput"] = common_throughput(result, common)
        result["same_work_request_throughput"] = same
    return results, part


def _replay_tasks(args: argparse.Namespace, budget: int) -> tuple[ModelGeometry, list[ReplayTask]]:
    """The model's geometry and one task per allocator, from the options (one-line
    errors for bad ones, and for a run the GPU profile cannot hold, before the trace is
    read)."""
    from avmp.bench.sweep import has_host_tier, layout_policy
    from avmp.cli.generate import check_prefix_host_level
    from avmp.models.zoo import resolve_model
    from avmp.sim.simulator import SimConfig
    from avmp.sim.timing import check_feasible, get_profile

    allocators = _allocators(args.allocators)
    if args.calibration is not None:
        with open(args.calibration):
            pass  # a missing file (or a directory) is a one-line error, before any work
    geometry = resolve_model(args.model, ssm_dtype=ssm_dtype_choice(args.ssm_dtype))
    if args.tensor_parallel is not None:
        geometry = _rank_geometry(geometry, args.tensor_parallel, args.calibration)
    shipped = static_options(args.static_options)
    policy = policy_options(args)
    if args.prefix_host_level:
        check_prefix_host_level(args.prefix_cache, policy["preemption"], policy["host_tier_bytes"])
    if args.charge_captures and args.calibration is None:
        raise UserError("--charge-captures goes with --calibration (the roofline knows no graphs)")
    config = SimConfig(
        profile=args.profile,
        calibration=args.calibration,
        charge_graph_captures=args.charge_captures,
        overlap=args.overlap,
        prefix_cache=args.prefix_cache,
        max_num_seqs=_at_least_one(args, "max_num_seqs"),
        max_num_batched_tokens=_at_least_one(args, "max_num_batched_tokens"),
        **policy,
    )
    if not args.ignore_feasibility:  # before reading the trace: the run could not exist
        check_feasible(
            geometry,
            budget,
            get_profile(args.profile),
            config.max_num_batched_tokens,
            config.max_num_seqs,
        )
    tasks = []
    for layout in allocators:
        layout_fields, layout_options = layout_policy(layout, policy)
        options = tuple(dict.fromkeys((*shipped, *layout_options)))
        host_level = args.prefix_host_level and has_host_tier(layout_fields)
        layout_config = dataclasses.replace(config, **layout_fields, prefix_host_level=host_level)
        tasks.append(ReplayTask(layout, options, layout_config))
    return geometry, tasks


def _check_some_completed(trace: str, results: list[dict[str, Any]], inputs: ReplayInputs) -> None:
    """A one-line error where no allocator completed a request: none fits the budget."""
    if any(r["num_completed"] for r in results):
        return
    smallest = min(inputs.geometry.request_bytes(r.total_tokens) for r in inputs.requests)
    raise UserError(
        f"{trace}: no request fits in {format_bytes(inputs.budget)} with any allocator "
        f"(the smallest needs {format_bytes(smallest)}); check --memory and the trace's "
        "token counts"
    )


def rerun_on_common(
    tasks: list[ReplayTask],
    inputs: ReplayInputs,
    results: list[dict[str, Any]],
    workers: int | None,
    bar: Any,
) -> list[float | None]:
    """Each allocator's req/s on the same work (`avmp.sim.metrics.same_work_throughputs`,
    as ``avmp bench`` reruns its cells): where the allocators completed different
    requests (one rejected long prompts another served), each replays again on only the
    requests all of them completed, from the same arrivals; else its own req/s."""
    from avmp.sim.metrics import same_work_ids, same_work_throughputs

    ids = same_work_ids([r["completed_requests"]["request_id"] for r in results])
    if ids is None:
        return same_work_throughputs(results, None)
    common = dataclasses.replace(
        inputs, requests=[r for r in inputs.requests if r.request_id in ids]
    )
    reruns = _run_with_bars(bar, tasks, common, workers, ", same requests")
    return same_work_throughputs(results, reruns)


def _run_with_bars(
    bar: Any, tasks: list[ReplayTask], inputs: ReplayInputs, workers: int | None, label: str
) -> list[dict[str, Any]]:
    """`run_replays` with a progress bar per task (``label`` after its allocator's name);
    ``workers`` None: one per task up to the CPUs for `PARALLEL_FROM` requests or more."""
    total = len(inputs.requests)
    if workers is None:
        workers = min(len(tasks), os.cpu_count() or 1) if total >= PARALLEL_FROM else 1
    bars = {t.layout: bar.add_task(t.layout + label, total=total) for t in tasks}

    def progress(layout: str, done: int, total: int) -> None:
        bar.update(bars[layout], completed=done, total=total)

    return run_replays(tasks, inputs, workers, progress)


def trace_window(args: argparse.Namespace) -> TraceWindow:
    """The part of the trace that ``--start``, ``--duration`` and ``--max-requests``
    take (a one-line error naming the option for a bad value)."""
    from avmp.bench.traces import TraceWindow

    start = _seconds_option("--start", args.start, allow_zero=True) or 0.0
    duration = _seconds_option("--duration", args.duration, allow_zero=False)
    return TraceWindow(start, duration, count_option("--max-requests", args.max_requests))


def _seconds_option(flag: str, text: str | None, allow_zero: bool) -> float | None:
    """A number of seconds given as ``flag`` (None: not given): finite, and >= 0
    (``allow_zero``) or > 0."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{flag} must be a number of seconds {bound}, got {text!r}")
    return seconds


PARALLEL_FROM = 2000  # requests from which the allocators run at once by default


@dataclasses.dataclass(frozen=True)
class ReplayTask:
    """One allocator's replay: its layout, the layout options and its simulator config."""

    layout: str
    options: tuple[str, ...]
    config: Any  # SimConfig


@dataclasses.dataclass(frozen=True)
class ReplayInputs:
    """What every allocator's replay shares: the trace's requests, the model, the budget."""

    requests: list[Any]
    geometry: Any
    budget: int


def _at_least_one(args: argparse.Namespace, field: str) -> int:
    """A batch limit (``--max-num-seqs``, ``--max-num-batched-tokens``), a one-line error
    below 1 (the scheduler's own error would not name the option)."""
    value: int = getattr(args, field)
    if value < 1:
        raise UserError(f"--{field.replace('_', '-')} must be >= 1, got {value}")
    return value


def _workers(text: str | None, num_tasks: int) -> int | None:
    workers = count_option("--workers", text)
    return None if workers is None else min(workers, num_tasks)


def run_replays(
    tasks: list[ReplayTask],
    inputs: ReplayInputs,
    workers: int,
    progress: Callable[[str, int, int], None],
) -> list[dict[str, Any]]:
    """Each task's result, in the tasks' order: one at a time, or ``workers`` at once in
    spawned processes (the same results; progress comes back through a queue). Where
    processes cannot start, the replays run here one at a time."""
    if workers > 1:
        results = _replay_on_processes(tasks, inputs, workers, progress)
        if results is not None:
            return results
    return [_replay_one(t, inputs, progress) for t in tasks]


def _replay_one(
    task: ReplayTask, inputs: ReplayInputs, progress: Callable[[str, int, int], None] | None
) -> dict[str, Any]:
    from avmp.bench.sweep import make_allocator
    from avmp.sim.simulator import simulate

    geometry = inputs.geometry
    allocator = make_allocator(task.layout, geometry, inputs.budget, task.options)
    on_progress = None
    if progress is not None:

        def on_progress(done: int, total: int) -> None:
            progress(task.layout, done, total)

    result = simulate(inputs.requests, allocator, geometry, task.config, on_progress=on_progress)
    return result.to_dict() | {"allocator": task.layout}


class _QueuedProgress:
    """A worker's progress, put on a queue at most every 1% of the trace (and at its end)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.sent: dict[str, int] = {}

    def __call__(self, layout: str, done: int, total: int) -> None:
        if done == total or done - self.sent.get(layout, 0) >= max(1, total // 100):
            self.sent[layout] = done
            self.queue.put((layout, done, total))


def _replay_in_worker(task: ReplayTask, inputs: ReplayInputs, queue: Any) -> dict[str, Any]:
    return _replay_one(task, inputs, _QueuedProgress(queue))


def _replay_on_processes(
    tasks: list[ReplayTask],
    inputs: ReplayInputs,
    workers: int,
    progress: Callable[[str, int, int], None],
) -> list[dict[str, Any]] | None:
    """The results, or None where processes cannot start (a sandbox without them, no
    /dev/shm). A worker that dies mid-run is an error, not a reason to start over."""
    import multiprocessing
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no fork of the progress thread
    try:
        manager = context.Manager()  # starts a process: where none can, nothing does
    except (OSError, ImportError):  # no process, or no working semaphores (sem_open)
        return None
    with manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        updates = manager.Queue()
        futures = {pool.submit(_replay_in_worker, t, inputs, updates): t for t in tasks}
        pending = set(futures)
        try:
            while pending:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        progress(*updates.get_nowait())
                    except queues.Empty:
                        break
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        by_layout = {futures[f].layout: f.result() for f in futures}
    return [by_layout[t.layout] for t in tasks]


def replay_progress(disabled: bool) -> Any:
    """A bar per allocator (requests finished of the trace's) on stderr, gone once the
    table is printed; off when stderr is not a terminal (a log or a pipe) or asked."""
    import sys

    from rich import progress as bars
    from rich.console import Console

    return bars.Progress(
        bars.TextColumn("{task.description:>16}"), bars.BarColumn(), bars.MofNCompleteColumn(),
        bars.TimeElapsedColumn(), bars.TimeRemainingColumn(), console=Console(stderr=True),
        transient=True, disable=disabled or not sys.stderr.isatty(),
    )  # fmt: skip


def _rank_geometry(
    geometry: ModelGeometry, tensor_parallel: str, calibration: str | None
) -> ModelGeometry:
    """One rank's geometry over ``--tensor-parallel`` GPUs (the pools of every rank are
    alike, so one rank's allocator stands for all)."""
    from avmp.cli.plan import num_gpus_choice
    from avmp.models.tensor_parallel import rank_geometry

    if calibration is not None:
        raise UserError("--tensor-parallel needs the roofline: a calibration is of one GPU")
    return rank_geometry(geometry, num_gpus_choice(tensor_parallel))


def _allocators(text: str) -> list[str]:
    from avmp.bench.sweep import LAYOUTS

    allocators = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in allocators if a not in LAYOUTS]
    if unknown or not allocators:
        raise UserError(
            f"unknown allocator {unknown[0] if unknown else '(none)'!r}; "
            f"known: {', '.join(LAYOUTS)}"
        )
    return allocators


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or not reference > 0:
        return "n/a"
    return f"{value / reference:.2f}x"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _row(result: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    def vs_avmp(key: str) -> str:
        return "n/a" if reference is None else _ratio(result[key], reference[key])

    return [
        result["allocator"],
        str(result["num_completed"]),
        str(result["num_rejected"]),
        f"{result['request_throughput']:.3f}",
        f"{result['output_token_throughput']:.1f}",
        vs_avmp("request_throughput"),
        f"{result['common_request_throughput']:.3f}",
        vs_avmp("common_request_throughput"),
        _rate(result["same_work_request_throughput"]),
        vs_avmp("same_work_request_throughput"),
        f"{result['goodput']:.3f}",
        str(result["num_oom_events"]),
        f"{result['num_preemptions']} ({result.get('num_swapped_out', 0)})",
        f"{result['ttft_p50_s']:.2f} / {result['ttft_p99_s']:.2f}",
        f"{result['tpot_p50_s'] * 1e3:.1f} / {result['tpot_p99_s'] * 1e3:.1f}",
        f"{result['makespan_s']:.1f}",
    ]


def run(args: argparse.Namespace) -> int:
    from avmp.bench.report import markdown_table
    from avmp.sim.metrics import common_request_ids, same_work_ids

    results, part = replay(args)
    read_as = trace_read_as(part)
    if args.json:
        if read_as:  # what was assumed, beside the results that stdout keeps to JSON
            print(f"{args.trace}: {read_as}", file=sys.stderr)
        print(json.dumps(results, indent=1, sort_keys=True))
        return 0
    avmp = [r for r in results if r["allocator"] == "avmp"]
    reference = avmp[0] if avmp else None
    num_common = len(common_request_ids(results) or ())
    rerun = same_work_ids([r["completed_requests"]["request_id"] for r in results])
    same = (
        "the allocators completed the same requests (their own req/s)"
        if rerun is None
        else f"each allocator replayed again on only those {len(rerun)}, from the same arrivals"
    )
    print(
        f"{args.trace}: {results[0]['num_requests']} requests{_taken(part, trace_window(args))}, "
        f"{args.model}, "
        f"{format_bytes(parse_budget('--memory', args.memory))}, profile {args.profile}"
        f"{'' if args.tensor_parallel is None else f' x {args.tensor_parallel} GPUs'}, "
        f"at most {args.max_num_seqs} requests and {args.max_num_batched_tokens} tokens a step"
        f"{', each planned while the previous one runs' if args.overlap else ''}; "
        f"all completed: the {num_common} requests every allocator completed; "
        f"same requests: {same}; "
        f"goodput: {slo_targets(args).describe()}"
        f"{f'; {read_as}' if read_as else ''}"
    )
    print(markdown_table((list(COLUMNS), [_row(r, reference) for r in results])))
    if args.prefix_cache != "off":
        print(prefix_summary(results))
    held = held_summary(results)
    if held:
        print(held)
    return 0


def trace_read_as(part: TracePart) -> str:
    """How the trace's file was read where its columns were found by name, its time unit
    set by --time-unit or it has no times (`avmp.bench.traces.TraceColumns`); empty for a
    known format read as it defines itself."""
    columns = part.columns
    return columns.describe() if columns is not None and columns.is_generic else ""


def _taken(part: TracePart, window: TraceWindow) -> str:
    """What part of the trace was replayed, for the header (empty: all of it)."""
    if len(part.requests) == part.num_trace_requests:
        return ""
    taken = []
    if window.start_s or window.duration_s is not None:
        taken.append(f"arriving {window.describe_span()}, re-based to 0")
    if window.max_requests is not None:
        taken.append(f"the first {window.max_requests}" + (" of those" if taken else ""))
    return f" of its {part.num_trace_requests} ({'; '.join(taken)})"


def held_summary(results: list[dict[str, Any]]) -> str:
    """One line per allocator that held turns until the answer they hold had ended
    (`avmp.sim.simulator`); empty when none did."""
    return "\n".join(
        f"{r['allocator']}: {r['held_arrivals']['num_requests']} requests naming an earlier "
        f"output arrived before it ended and were sent at its end "
        f"({r['held_arrivals']['total_s']:.1f} s of delay in all)"
        for r in results
        if r.get("held_arrivals")
    )


def prefix_summary(results: list[dict[str, Any]]) -> str:
    """One line per allocator of what the prefix cache did (shared with ``avmp bench``)."""
    lines = []
    for result in results:
        prefix = result.get("prefix") or {}
        if not prefix:
            continue
        lines.append(
            f"{result['allocator']}: prefix cache {prefix['policy']} "
            f"({prefix['eviction']} eviction): {prefix['num_hit_tokens']} of "
            f"{prefix['num_ideal_tokens']} reusable prompt tokens hit "
            f"({prefix['hit_rate_vs_ideal']:.1%} of the ideal), "
            f"{prefix['num_checkpoints_taken']} checkpoints taken, peak "
            f"{format_bytes(prefix['peak_checkpoint_bytes'])}, evicted "
            f"{prefix['num_evicted_checkpoints']} checkpoints and "
            f"{prefix['num_evicted_pages']} pages"
            + _host_level_summary(prefix)
            + _rules_summary(prefix)
        )
    return "\n".join(lines)


def _rules_summary(prefix: dict[str, Any]) -> str:
    """avmp's placement rules: checkpoints taken / resumed from, and those its learning
    demoted or promoted (empty for the peers' policies)."""
    rules = prefix.get("rules")
    if not rules:
        return ""
    text = ", ".join(f"{kind} {r['taken']}/{r['reused']}" for kind, r in rules.items())
    for change in ("demoted", "promoted"):
        if prefix.get(change):
            text += f"; {change} {', '.join(prefix[change])}"
    return f"; rules (checkpoints taken/resumed from): {text}"


def _host_level_summary(prefix: dict[str, Any]) -> str:
    """What the prefix cache's host level did (empty where it did not run)."""
    host = prefix.get("host_level")
    if not host:
        return ""
    return (
        f"; host level: {host['num_kept']} checkpoints kept ("
        f"{format_bytes(host['num_bytes_out'])} copied out), {host['num_restored']} hits "
        f"restored ({host['num_hit_tokens']} tokens, {format_bytes(host['num_bytes_in'])} "
        f"copied in), {host['num_dropped']} dropped"
    )
