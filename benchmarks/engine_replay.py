"""A trace replayed through the engine on real GPU memory, once per layout (AVMP,
SGLang's static split, vLLM's unified pool; same model, same kernels), beside the
simulator's prediction for the same trace and arrivals.

The trace: a file (``--trace``), or a workload preset built on the spot (``--workload
longdoc_mix --num-requests N --seed S``, `avmp.bench.workloads.make_workload`), so the GPU
machine needs no committed file. ``--write-trace`` samples ``--num-requests`` ShareGPT
conversations under vLLM's rules (real prompt and output lengths, Mistral's tokenizer),
all arriving at t = 0; it is written once here and committed, since the GPU machine has
neither the dataset nor the tokenizer. Prompts are random token ids of those lengths;
every request generates exactly its output length (``ignore_eos``).

Arrivals (``--arrivals``): ``trace`` (the default) replays the trace's arrival times on
both sides, the first at t = 0 (an online replay: the engine sleeps while nothing has
arrived); ``zero`` puts every request at t = 0 (an offline replay: the queue is full from
the start, so memory decides the batch). Per layout the report gives req/s, output tok/s,
preemptions, TTFT and TPOT percentiles and goodput under the objectives of ``avmp
replay`` (``--slo-ttft-s``, ``--slo-tpot-ms``). The engine's times are wall times of the
host reading each token, graph captures included; its req/s and goodput are over the
run's wall time less the graph captures. ``--unbounded`` adds one reference run of the
same trace on AVMP with a budget that holds the ``--max-num-seqs`` largest requests at
once (so no request is preempted), and the report gives each layout's throughput lost to
preemption: 1 - its req/s / the reference's.

Per layout the engine runs the whole trace with the Triton kernels and decode CUDA
graphs, AVMP and static on the CUDA VMM backing (chunks mapped as the pools grow),
unified on one plain buffer (as vLLM allocates it); a budget small enough that memory,
not ``--max-num-seqs``, limits the batch. Steps are profiled with CUDA events (no sync:
steps still overlap, as in benchmarks/engine.py); steps that captured a CUDA graph are
one-off work and reported apart. The layouts are replayed ``--rounds`` times in turn and the
last round is reported: the first pays Triton's compilation of the kernel variants the
trace's shapes need, which would otherwise fall on whichever layout runs first. Before
each timed run the engine captures the prefill and mixed graphs its warm-up would
(`capture_common_mixed`). The simulator replays the same trace with the same scheduler
limits and allocator, its clock from a step-time calibration (``--calibration``; default
the committed one of the device and model: benchmarks/engine.py's cells, or a fit of
replays' own steps by benchmarks/calibrate.py). Where the calibration records what a
graph capture cost the engine, the simulator charges each graph it captures mid-run, and
its req/s and goodput are over its makespan less those captures, as the engine's are.

``--resimulate CAL --markdown FILE`` reruns, on the CPU, the simulated column of a results
file (every layout and the unbounded run) with the calibration CAL and prints the tables
with the new figures (``--out NEW`` also saves them): the trace is rebuilt as the run built
it, from the workload, seed, size and arrivals the file records, or from its trace file
(``--trace`` where the recorded path is not here). A time model fixed after a GPU run is
then checked against the engine without rerunning the GPU.

``--simulate-only`` (CPU, no engine): every ``--allocators`` layout simulated over the
trace at each budget of ``--memory`` (several allowed here, one per GPU run), one table
row per budget: simulated req/s per layout, AVMP's ratios to the others, the requests of
512 + 256 tokens that AVMP, unified and static hold at once as `avmp plan` counts them
(`avmp.memory.planner.plan`), and whether issue 12's engine criteria hold in simulation
(AVMP >= 1.00x unified and >= 1.3x static, its gain over unified at least half the
capacity gain). It picks the budgets a GPU run should measure; ``--out`` saves the sweep
and ``--markdown`` prints it again.

Usage::

    python -m benchmarks.engine_replay --write-trace benchmarks/traces/sharegpt_vllm_600.jsonl
    PYTHONPATH=src python3 -m benchmarks.engine_replay \\
        --trace benchmarks/traces/sharegpt_vllm_600.jsonl --out $OUT/engine_replay_h100.json.gz
    PYTHONPATH=src python3 -m benchmarks.engine_replay --workload longdoc_mix \\
        --num-requests 300 --unbounded --out $OUT/engine_replay_longdoc.json.gz
    python -m benchmarks.engine_replay --markdown benchmarks/results/engine_replay_h100.json.gz \\
        --plot docs/figures/engine_replay_h100.png
    python -m benchmarks.engine_replay --markdown engine_replay_longdoc_h200.json.gz \\
        --resimulate benchmarks/results/calibration_h200_granite-4.0-h-micro.json
    python -m benchmarks.engine_replay --simulate-only --trace \\
        benchmarks/traces/sharegpt_vllm_600.jsonl --memory 1GiB 1.5GiB 2GiB 3GiB \\
        --calibration benchmarks/results/calibration_h200_granite-4.0-h-micro.json.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from avmp.cli.replay import add_slo_arguments, slo_targets
from avmp.sched.request import RequestSpec
from avmp.sim.metrics import RequestClock, SloTargets, goodput, percentile
from avmp.units import ceil_div, parse_bytes, round_up
from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    gpu_profile,
    read_result,
    repo_path,
    save_figure,
    write_result,
)

DEFAULT_MODEL = "granite-4.0-h-micro"
ALLOCATORS = ("avmp", "static", "unified")
# vLLM's layout as it ships (recompute only, greedy admission; avmp.bench.sweep); opt-in
LAYOUTS = (*ALLOCATORS, "unified-shipped")
ARRIVALS = ("trace", "zero")
UNBOUNDED_ALLOCATOR = "avmp"
WRITE_TRACE_REQUESTS = 600
# the request the done-when of issue 12 weighs capacity by: `avmp plan`'s default shape
PLAN_PROMPT_TOKENS, PLAN_OUTPUT_TOKENS = 512, 256
PLAN_LAYOUTS = ("avmp", "unified", "static")
MIN_GAIN_OVER_STATIC = 1.3  # issue 12: AVMP >= 1.3x static


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-trace", type=Path, help="sample ShareGPT into this JSONL trace")
    parser.add_argument("--num-requests", type=int,
                        help=f"requests of --write-trace (default {WRITE_TRACE_REQUESTS}) "
                             "or --workload (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, help="JSONL trace to replay (on the GPU)")
    parser.add_argument("--workload", help="replay this workload preset instead of a trace")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="trace",
                        help="trace: the trace's arrival times (online); zero: all at t = 0")
    parser.add_argument("--unbounded", action="store_true",
                        help="add a reference run with memory for every running request")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo geometry, random weights")
    parser.add_argument("--memory", nargs="+", default=["3GiB"], metavar="SIZE",
                        help="cache budget of each layout; with --simulate-only several, "
                             "one row each")
    parser.add_argument("--simulate-only", action="store_true",
                        help="CPU: simulate every layout at each --memory budget beside "
                             f"`avmp plan`'s capacity for {PLAN_PROMPT_TOKENS} + "
                             f"{PLAN_OUTPUT_TOKENS}-token requests (no engine, no GPU)")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=LAYOUTS,
                        help="layouts to replay; unified-shipped is vLLM's pool with vLLM's "
                             "own policy (recompute only, greedy admission)")
    parser.add_argument("--calibration", type=Path, help="step-time calibration for the sim")
    parser.add_argument("--rounds", type=int, default=2,
                        help="replays of every layout; the last is reported (the first "
                             "compiles Triton's variants and fills its cache)")
    parser.add_argument("--device", default="cuda", help="cpu: reference kernels (smoke test)")
    parser.add_argument("--backing", default="vmm", choices=("vmm", "buffer"),
                        help="AVMP's and static's memory: CUDA VMM, or one torch buffer")
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the docs table of a results file")
    parser.add_argument("--plot", type=Path, help="with --markdown: draw the pool split here")
    parser.add_argument("--resimulate", type=Path, metavar="CAL",
                        help="with --markdown FILE: rerun FILE's simulated column with this "
                             "calibration on the CPU (--out: save the new results)")
    add_slo_arguments(parser)
    args = parser.parse_args(argv)
    # a GPU run replays one budget (--memory); a simulated sweep every one of them
    args.memory_budgets, args.memory = args.memory, args.memory[0]
    return args


# -- the trace (CPU, where the dataset is) -------------------------------------------------


def write_trace(path: Path, num_requests: int, seed: int) -> None:
    from avmp.bench.sharegpt import sample_lengths
    from avmp.bench.traces import write_jsonl
    from avmp.sched.request import RequestSpec

    prompts, outputs = sample_lengths(num_requests, seed, rules="vllm", progress=True)
    requests = [
        RequestSpec(i, 0.0, int(p), int(o))
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(requests, path)
    print(
        f"{path}: {num_requests} requests, prompt mean {prompts.mean():.0f} "
        f"(max {prompts.max()}), output mean {outputs.mean():.0f} (max {outputs.max()})"
    )


def load_trace(args: argparse.Namespace) -> list[RequestSpec]:
    """The requests to replay, timed as ``--arrivals`` says: the trace's arrivals moved
    so that the first is at t = 0, or all at t = 0.

    Raises:
        ValueError: both or neither of --trace and --workload, an unknown workload, a
            bad trace file (`avmp.bench.traces.TraceError` is a ValueError).
        FileNotFoundError: no such trace file.
    """
    from avmp.bench.traces import read_trace
    from avmp.bench.workloads import make_workload

    if (args.trace is None) == (args.workload is None):
        raise ValueError("give one trace source: --trace FILE or --workload NAME")
    if args.workload is not None:
        trace = make_workload(args.workload, args.seed, args.num_requests)
    else:
        trace = read_trace(args.trace)
    first = min(r.arrival_s for r in trace)
    timed = (0.0 if args.arrivals == "zero" else r.arrival_s - first for r in trace)
    return [dataclasses.replace(r, arrival_s=t) for r, t in zip(trace, timed, strict=True)]


def unbounded_memory_bytes(geometry: Any, trace: list[RequestSpec], max_num_seqs: int) -> int:
    """A cache budget in which no request of ``trace`` is preempted: the
    ``max_num_seqs`` largest requests whole at once (pages rounded up, one slot each),
    plus one chunk per pool for rounding, in whole chunks."""
    from avmp.memory.spec import CHUNK_GRANULARITY_BYTES, MemoryConfig

    block = MemoryConfig.block_size  # the engine's and the simulator's: both keep the default
    sizes = sorted(
        (ceil_div(r.total_tokens, block) * block * geometry.kv_bytes_per_token
         + geometry.state_bytes_per_request for r in trace),
        reverse=True,
    )  # fmt: skip
    chunk = CHUNK_GRANULARITY_BYTES
    return round_up(sum(sizes[:max_num_seqs]) + 2 * chunk, chunk)


# -- the replay (GPU) ------------------------------------------------------------------------


def layout_policy(layout: str) -> tuple[str, dict[str, Any]]:
    """The allocator a layout runs on and the policy fields it overrides: a ``-shipped``
    layout keeps its project's own preemption and admission (`avmp.bench.sweep`), the
    others run the engine's and the simulator's defaults."""
    from avmp.bench.sweep import layout_allocator
    from avmp.bench.sweep import layout_policy as shipped_policy

    if not layout.endswith("-shipped"):
        return layout, {}
    fields, _ = shipped_policy(layout, {})
    policy = {key: fields[key] for key in ("preemption", "admission")}
    return layout_allocator(layout), {**policy, "host_tier_bytes": 0}


def replay(
    args: argparse.Namespace,
    model: Any,
    allocator: str,
    trace: list[RequestSpec],
    memory_bytes: int | None = None,
) -> dict:
    """The engine over the whole trace, each request arriving at its ``arrival_s``, on
    one layout (and ``--memory``, or ``memory_bytes``); its figures and pool timeline."""
    import torch

    from avmp.engine.engine import Engine, EngineConfig
    from avmp.engine.fast_runner import FastModelRunner

    on_gpu = args.device == "cuda"
    base, policy = layout_policy(allocator)
    vmm = on_gpu and args.backing == "vmm" and base != "unified"
    config = EngineConfig(
        memory_bytes=memory_bytes or parse_bytes(args.memory), device=args.device,
        kernels="triton" if on_gpu else "reference", allocator=base,
        backing="cuda_vmm" if vmm else "torch",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
        **policy,
    )  # fmt: skip
    engine = Engine(model, config)
    runner = engine.runner
    profiled = isinstance(runner, FastModelRunner)  # the reference runner (CPU) has no profile
    captured_before = capture_common_mixed(engine) if profiled else []
    rng = np.random.default_rng(args.seed)
    vocab = engine.geometry.vocab_size
    prompts = [rng.integers(3, vocab, size=r.prompt_tokens).tolist() for r in trace]
    limits = [r.output_tokens for r in trace]
    if profiled:
        runner.profile.start()
    arrivals = [r.arrival_s for r in trace]
    outputs = engine.generate(prompts, max_tokens=limits, ignore_eos=True, arrival_s=arrivals)
    steps = runner.profile.steps if profiled else []
    if profiled:
        runner.profile.enabled = False
    capture_s = sum(
        b.started - a.started for a, b in zip(steps, steps[1:], strict=False) if a.captured
    )
    stats = engine.stats
    completed = sum(o.finish_reason == "length" for o in outputs)
    timed_s = stats.elapsed_s - capture_s
    allocator_stats = stats.allocator
    result = {
        "allocator": allocator,
        "backing": type(engine.backing).__name__,
        "num_requests": len(trace),
        "num_completed": completed,
        "num_rejected": sum(o.finish_reason == "rejected" for o in outputs),
        "wall_s": stats.elapsed_s,
        "graph_capture_s": capture_s,
        "num_graph_captures": sum(s.captured for s in steps),
        "timed_s": timed_s,
        "request_throughput": completed / timed_s,
        "output_token_throughput": stats.num_generated_tokens / timed_s,
        "idle_s": stats.idle_s,
        "num_steps": stats.num_steps,
        "num_preemptions": stats.num_preemptions,
        "num_recompute_tokens": stats.num_recompute_tokens,
        "num_oom_events": allocator_stats.num_oom_events,
        "num_migrations": allocator_stats.num_migrations,
        "chunks_migrated_to": allocator_stats.chunks_migrated_to,
        "num_compactions": allocator_stats.num_compactions,
        "num_placement_failures": getattr(engine.allocator, "num_placement_failures", 0),
        "peak_kv_capacity_bytes": stats.peak_kv_capacity_bytes,
        "peak_state_capacity_bytes": stats.peak_state_capacity_bytes,
        "max_running": max(
            [s.num_requests for s in steps] or [t["num_running"] for t in stats.timeline]
        ),
        "timeline": stats.timeline,
        "mixed_graphs_captured_before": captured_before,
        # per profiled step: prefill tokens, decode requests, context tokens, requests,
        # period (start to next start), runner seconds, graph replayed, graph captured,
        # longest prefill chunk, longest context of one request, attention pairs, rows
        # a padded step ran (absent from results before them; benchmarks/calibrate.py
        # reads them)
        "steps": [
            [s.num_prefill_tokens, s.num_decode_requests, s.num_context_tokens,
             s.num_requests, b.started - s.started, s.seconds, s.graph, s.captured,
             s.longest_prefill_tokens, s.longest_context_tokens, s.num_attention_pairs,
             s.num_padded_tokens]
            for s, b in zip(steps, steps[1:], strict=False)
        ],  # fmt: skip
        **engine_latencies(trace, outputs, timed_s, slo_targets(args)),
    }
    engine.backing.close()
    del engine, runner
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def capture_common_mixed(engine: Any) -> list[list[int]]:
    """Capture, before the timed run, the prefill and mixed graphs that `Engine.warmup`
    captures (the buckets a workload meets most, up to half of ``max_mixed_graphs``,
    with block tables for a step's worth of context), without the warm-up's prompts,
    which would move AVMP's pool split before the run. Without it every bucket is
    captured mid-run, where the captures shift the engine's steps against the trace's
    arrivals. Returns the captured buckets as the simulator's `GraphRule` keys: tokens,
    sequences, block-table width in tokens (none where mixed graphs are off)."""
    runner, config = engine.runner, engine.config
    if not runner.use_mixed_graphs:
        return []
    context = min(config.max_model_len or config.max_num_batched_tokens,
                  config.max_num_batched_tokens)  # fmt: skip
    shapes = runner.common_mixed_shapes(config.max_num_seqs, context)
    runner.capture_mixed(shapes[: runner.max_mixed_graphs // 2])
    block = config.block_size
    return [[key.num_tokens, key.num_seqs, key.width * block] for key in runner.mixed_graphs]


def engine_latencies(
    trace: list[RequestSpec], outputs: list[Any], makespan_s: float, slo: SloTargets
) -> dict[str, Any]:
    """TTFT and TPOT percentiles, goodput under ``slo`` over ``makespan_s``, and the
    per-request columns they come from, by the simulator's rules (`RequestClock`,
    `goodput`), from the engine's per-request times."""
    clock = RequestClock()
    for spec, output in zip(trace, outputs, strict=True):
        clock.arrival_s[spec.request_id] = output.arrival_s
        if output.finish_reason == "rejected" or output.first_token_s is None:
            continue
        clock.first_token_s[spec.request_id] = output.first_token_s
        clock.finish_s[spec.request_id] = output.finish_s
        clock.num_output[spec.request_id] = len(output.token_ids)
    columns = clock.completed_columns()
    ttfts, tpots = clock.ttfts(), clock.tpots()
    return {
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "goodput": goodput({"completed_requests": columns, "makespan_s": makespan_s}, slo),
        "completed_requests": columns,
    }


def warm_up(args: argparse.Namespace, model: Any) -> None:
    """Compile every kernel variant once (chunked prefill, decode, mixed steps), so
    that no layout's timed run pays Triton's compilation."""
    from avmp.engine.engine import Engine, EngineConfig

    on_gpu = args.device == "cuda"
    if not on_gpu:  # the reference kernels compile nothing: torch's first call alone
        engine = Engine(model, EngineConfig(64 << 20, device=args.device))
        engine.warmup()
        engine.backing.close()
        return
    config = EngineConfig(1 << 30, device=args.device,
                          kernels="triton" if on_gpu else "reference", max_num_seqs=16,
                          max_num_batched_tokens=args.max_batched_tokens)  # fmt: skip
    engine = Engine(model, config)
    rng = np.random.default_rng(args.seed + 1)
    vocab = engine.geometry.vocab_size
    # short and long prompts: chunks that start past one step's token budget and
    # attention over contexts of tens of thousands of tokens compile their own variants
    lengths = [7, 300, 40, 1500, 12, 700, 3, 90] * 2 + [9000, 20000]
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    outputs = [4, 9, 2, 5, 16, 3, 8, 6] * 2 + [3, 5]
    engine.generate(prompts, max_tokens=outputs, ignore_eos=True)
    engine.backing.close()


def sim_profile(args: argparse.Namespace) -> str:
    """The simulator's GPU profile: the CUDA device's, ``h100`` on the CPU (its figures
    matter only without a calibration, and for the host link of swaps)."""
    if args.device != "cuda":
        return "h100"
    import torch

    return gpu_profile(torch.cuda.get_device_name())


def sim_geometry(model_name: str, model: Any = None) -> Any:
    """The geometry the engine sees (bf16 state, vLLM's conv columns), for the simulator,
    named as the calibration names the model; of ``model``, or of the zoo model built on
    the meta device (shapes, no weights) when none is given."""
    import torch

    from avmp.models.geometry import ConvColumns
    from benchmarks.engine import build_model, transformers_config

    if model is None:
        model = build_model(transformers_config(model_name), torch.device("meta"))
    geometry = model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)
    return dataclasses.replace(geometry, name=model_name)


def simulate(
    args: argparse.Namespace,
    geometry: Any,
    allocator: str,
    trace: list[RequestSpec],
    memory_bytes: int | None = None,
    profile: str | None = None,
    shapes: list[Any] | None = None,
    captured_mixed_graphs: list[list[int]] | None = None,
) -> dict:
    """The simulator's prediction for the same trace and arrivals, limits, budget and
    layout (the simulator's unified layout is the engine's, deviation included), on
    ``profile`` (default `sim_profile`); each step's `BatchShape` appended to ``shapes``
    when given. ``captured_mixed_graphs``: the engine run's prefill and mixed graphs
    captured before it (`capture_common_mixed`), which the simulator's graph rule starts
    from."""
    from avmp.memory.registry import make_allocator
    from avmp.memory.spec import MemoryConfig
    from avmp.sim.simulator import SimConfig
    from avmp.sim.simulator import simulate as run_sim

    profile = profile or sim_profile(args)
    base, policy = layout_policy(allocator)
    config = SimConfig(
        profile=profile, calibration=str(args.calibration), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, **policy,
        captured_mixed_graphs=tuple(tuple(key) for key in captured_mixed_graphs or ()),
        charge_graph_captures=True,  # as the engine's run met them, mid-run
        overlap=True,  # the engine's steps overlap (EngineConfig's default)
    )  # fmt: skip
    memory = MemoryConfig(memory_bytes or parse_bytes(args.memory))
    layout = make_allocator(base, geometry, memory)
    kinds = StepKinds()

    def on_step(shape: Any, seconds: float) -> None:
        kinds.add(shape, seconds)
        if shapes is not None:
            shapes.append(shape)

    result = run_sim(trace, layout, geometry, config, on_step=on_step).to_dict()
    keys = ("makespan_s", "request_throughput", "output_token_throughput", "num_preemptions",
            "num_completed", "num_rejected", "num_steps", "allocator_stats", "timeline",
            "phase_s", "time_model", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "completed_requests")  # fmt: skip
    captures = {key: result.get(key, 0)
                for key in ("num_graph_captures", "graph_capture_s", "captured_steps_s")}
    return (
        {key: result[key] for key in keys}
        | captures
        | {"step_kinds": kinds.figures(), "mean_running": _mean_running(result["timeline"])}
        | _rates_less_captures(result)
        | {"goodput": goodput(_less_captures(result), slo_targets(args))}
    )


class StepKinds:
    """Where a simulated run's step time goes: per kind of step (``decode``: decode rows
    only; ``mixed``: prefill tokens, with or without decode rows beside them) the steps,
    their seconds, the decode rows and the prefill tokens they held."""

    def __init__(self) -> None:
        self.kinds = {kind: {"steps": 0, "seconds": 0.0, "decode_rows": 0, "prefill_tokens": 0}
                      for kind in ("decode", "mixed")}  # fmt: skip

    def add(self, shape: Any, seconds: float) -> None:
        kind = self.kinds["mixed" if shape.num_prefill_tokens else "decode"]
        kind["steps"] += 1
        kind["seconds"] += seconds
        kind["decode_rows"] += shape.num_decode_requests
        kind["prefill_tokens"] += shape.num_prefill_tokens

    def figures(self) -> dict[str, dict[str, float]]:
        return {name: dict(kind) for name, kind in self.kinds.items()}


def _mean_running(timeline: list[dict[str, Any]]) -> float | None:
    """Requests running, averaged over the timeline's points (evenly spaced in steps)."""
    points = [point["num_running"] for point in timeline if "num_running" in point]
    return sum(points) / len(points) if points else None


def _less_captures(result: dict[str, Any]) -> dict[str, Any]:
    """A simulated result timed as the engine times its run: its clock includes the
    graph captures it charged (so that arrivals fall into the steps they fall into in
    the engine), its rates are over the makespan less them and less the steps that
    captured them, as the engine's are over its wall time less each capturing step
    whole, capture and run (``timed_s``; results from before ``captured_steps_s``
    subtract the captures alone)."""
    capture_s = result.get("graph_capture_s", 0.0) + result.get("captured_steps_s", 0.0)
    if not capture_s:
        return result
    return result | {"makespan_s": result["makespan_s"] - capture_s}


def _rates_less_captures(result: dict[str, Any]) -> dict[str, Any]:
    """``timed_s``, req/s and output tok/s over the makespan less the graph captures
    (`_less_captures`; the simulator's own figures where it charged none)."""
    timed_s = _less_captures(result)["makespan_s"]
    if timed_s == result["makespan_s"] or timed_s <= 0:
        return {"timed_s": result["makespan_s"]}
    return {
        "timed_s": timed_s,
        "request_throughput": result["num_completed"] / timed_s,
        "output_token_throughput": result["num_output_tokens"] / timed_s,
    }


def run_replays(args: argparse.Namespace, trace: list[RequestSpec]) -> dict[str, Any]:
    """Every layout over ``trace`` (``--rounds`` times in turn, the last kept), engine
    and simulator, then the unbounded reference run if asked for."""
    import torch

    from benchmarks.engine import build_model, transformers_config

    if args.calibration is None:
        args.calibration = default_calibration(sim_profile(args), args.model)
    model = build_model(transformers_config(args.model), torch.device(args.device))
    results = _conditions(args, trace)
    geometry = sim_geometry(args.model, model)
    results["sim_geometry"] = _geometry_figures(geometry)
    warm_up(args, model)
    results["earlier_rounds"] = []
    for round_index in range(args.rounds):
        label = f"round {round_index + 1}"
        runs = [_run(args, model, geometry, name, trace, label) for name in args.allocators]
        if round_index + 1 < args.rounds:  # kept small: figures, no timelines or steps
            results["earlier_rounds"].append([_summary(run["engine"]) for run in runs])
        results["runs"] = runs
    if args.unbounded:
        memory_bytes = unbounded_memory_bytes(geometry, trace, args.max_num_seqs)
        run = _run(args, model, geometry, UNBOUNDED_ALLOCATOR, trace, "unbounded", memory_bytes)
        results["unbounded"] = run | {"memory_bytes": memory_bytes}
    return results


def default_calibration(profile: str, model: str) -> Path:
    """The committed calibration of ``model`` on the device's profile (compressed or
    not), or on the H100 where the device has none (the only one before the H200's)."""
    for name in (f"calibration_{profile}_{model}.json.gz", f"calibration_{profile}_{model}.json"):
        if (RESULTS_DIR / name).is_file():
            return RESULTS_DIR / name
    return RESULTS_DIR / f"calibration_h100_{model}.json"


def _conditions(args: argparse.Namespace, trace: list[RequestSpec]) -> dict[str, Any]:
    """What a result records about how it was made, beside its runs."""
    import torch

    on_gpu = args.device == "cuda"
    source = {"workload": args.workload, "seed": args.seed} if args.workload else {}
    source["num_requests"] = len(trace)
    return {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "trace": repo_path(args.trace) if args.trace is not None else None,
        **source,
        "arrivals": args.arrivals,
        "arrival_span_s": max(r.arrival_s for r in trace),
        "slo": {"ttft_s": args.slo_ttft_s, "tpot_ms": args.slo_tpot_ms},
        "memory": args.memory,
        "backing": args.backing,
        "max_num_seqs": args.max_num_seqs,
        "max_batched_tokens": args.max_batched_tokens,
        "calibration": repo_path(args.calibration),
        "sim_profile": sim_profile(args),
        "prompt_tokens": sum(r.prompt_tokens for r in trace),
        "output_tokens": sum(r.output_tokens for r in trace),
        "runs": [],
    }


def _run(
    args: argparse.Namespace,
    model: Any,
    geometry: Any,
    allocator: str,
    trace: list[RequestSpec],
    label: str,
    memory_bytes: int | None = None,
) -> dict[str, Any]:
    """One layout on the engine and in the simulator, with a progress line."""
    start = time.perf_counter()
    engine_result = replay(args, model, allocator, trace, memory_bytes)
    captured = engine_result["mixed_graphs_captured_before"]
    sim_result = simulate(args, geometry, allocator, trace, memory_bytes,
                          captured_mixed_graphs=captured)  # fmt: skip
    print(
        f"{label}, {allocator}: engine {engine_result['request_throughput']:.2f} req/s "
        f"({engine_result['num_preemptions']} preemptions, "
        f"{engine_result['num_migrations']} migrations), sim "
        f"{sim_result['request_throughput']:.2f} req/s; "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return {"allocator": allocator, "engine": engine_result, "sim": sim_result}


def _geometry_figures(geometry: Any) -> dict[str, int]:
    """What a result records of the simulator's geometry, so that a resimulation can
    check that it rebuilt the same one."""
    return {
        "kv_bytes_per_token": geometry.kv_bytes_per_token,
        "state_bytes_per_request": geometry.state_bytes_per_request,
        "num_params": geometry.num_params,
    }


# -- resimulation (CPU) --------------------------------------------------------------------


def resimulate(
    results: dict[str, Any],
    calibration: Path,
    trace: Path | None,
    shapes: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """``results`` with the simulated column of every layout and of the unbounded run
    rerun with ``calibration``, over the trace the run replayed (rebuilt from what the
    results record; ``trace`` replaces the recorded trace file). With ``shapes``, each
    run's simulated step shapes go to ``shapes[layout]`` (``shapes["unbounded"]``).

    Raises:
        ValueError: a bad calibration, a rebuilt trace or geometry that is not the
            run's (the results do not record enough to rebuild them), or a budget sweep.
        FileNotFoundError: the calibration or the trace file is missing.
    """
    from avmp.sim.calibration import load_calibration

    if results.get("kind") == SWEEP_KIND:
        raise ValueError("a budget sweep has no engine runs to resimulate: rerun it with "
                         "--simulate-only and the new --calibration")  # fmt: skip
    if not calibration.is_file():
        raise FileNotFoundError(f"no such calibration file: {calibration}")
    load_calibration(calibration)  # a bad file is one line here, not a traceback later
    args = resimulation_args(results, calibration, trace)
    requests = load_trace(args)
    _check_trace(results, requests)
    geometry = sim_geometry(results["model"])
    _check_geometry(results, geometry)
    profile = results.get("sim_profile") or gpu_profile(results["device"])
    resimulated = dict(results)
    shapes = {} if shapes is None else shapes
    resimulated["runs"] = [
        _resimulated_run(args, geometry, run, requests, profile,
                         shapes=shapes.setdefault(run["allocator"], []))
        for run in results["runs"]
    ]  # fmt: skip
    if results.get("unbounded"):
        unbounded = results["unbounded"]
        resimulated["unbounded"] = _resimulated_run(
            args, geometry, unbounded, requests, profile, unbounded["memory_bytes"],
            shapes.setdefault("unbounded", []),
        )  # fmt: skip
    resimulated["resimulated"] = {
        "calibration": repo_path(calibration),
        "run_calibration": results.get("calibration"),
        "sim_profile": profile,
    }
    resimulated["calibration"] = repo_path(calibration)
    return resimulated


def _check_geometry(results: dict[str, Any], geometry: Any) -> None:
    """Raise ValueError unless the rebuilt geometry has the run's unit sizes (what the
    allocators and a calibrated clock read; the parameter count only prices the
    roofline, which a resimulation does not use, and its counting of tied embeddings
    has changed since some runs)."""
    recorded = results.get("sim_geometry")
    rebuilt = _geometry_figures(geometry)
    if recorded is None:
        return
    if any(recorded[key] != rebuilt[key] for key in _UNIT_FIGURES):
        raise ValueError(
            f"the geometry of {results['model']} rebuilt here ({rebuilt}) is not the run's "
            f"({recorded})"
        )


_UNIT_FIGURES = ("kv_bytes_per_token", "state_bytes_per_request")


def resimulation_args(
    results: dict[str, Any], calibration: Path, trace: Path | None
) -> argparse.Namespace:
    """The options the run was made with, as far as the simulator and the trace need
    them, from what ``results`` records (older results: all arriving at t = 0, and as
    many requests as the engine ran)."""
    num_requests = results.get("num_requests", results["runs"][0]["engine"]["num_requests"])
    if results.get("workload"):
        source = ["--workload", results["workload"], "--seed", str(results["seed"]),
                  "--num-requests", str(num_requests)]  # fmt: skip
    else:
        recorded = results.get("trace")
        if trace is None and recorded is None:
            raise ValueError("the results record no trace source: give --trace FILE")
        source = ["--trace", str(trace or REPO_ROOT / recorded)]  # recorded repo-relative
    slo = results.get("slo") or {}
    argv = [
        *source, "--arrivals", results.get("arrivals", "zero"), "--device", "cpu",
        "--model", results["model"], "--memory", results["memory"],
        "--max-num-seqs", str(results["max_num_seqs"]),
        "--max-batched-tokens", str(results["max_batched_tokens"]),
        "--calibration", str(calibration),
        *(["--slo-ttft-s", str(slo["ttft_s"])] if slo.get("ttft_s") is not None else []),
        *(["--slo-tpot-ms", str(slo["tpot_ms"])] if slo.get("tpot_ms") is not None else []),
    ]  # fmt: skip
    return parse_args(argv)


def _check_trace(results: dict[str, Any], trace: list[RequestSpec]) -> None:
    """Raise ValueError unless ``trace`` has the run's request count and token totals."""
    rebuilt = (len(trace), sum(r.prompt_tokens for r in trace), sum(r.output_tokens for r in trace))
    run = (results["runs"][0]["engine"]["num_requests"], results["prompt_tokens"],
           results["output_tokens"])  # fmt: skip
    if rebuilt != run:
        raise ValueError(
            f"the rebuilt trace ({rebuilt[0]} requests, {rebuilt[1]} prompt and {rebuilt[2]} "
            f"output tokens) is not the run's ({run[0]}, {run[1]}, {run[2]})"
        )


def _resimulated_run(
    args: argparse.Namespace,
    geometry: Any,
    run: dict[str, Any],
    trace: list[RequestSpec],
    profile: str,
    memory_bytes: int | None = None,
    shapes: list[Any] | None = None,
) -> dict[str, Any]:
    """One run with its simulated column redone (its old ``sim_placed`` dropped: that
    simulator is gone)."""
    captured = run["engine"].get("mixed_graphs_captured_before")  # absent from older runs
    sim = simulate(args, geometry, run["allocator"], trace, memory_bytes, profile, shapes, captured)
    kept = {k: v for k, v in run.items() if k != "sim_placed"}
    return kept | {"sim": sim}


def _summary(engine_result: dict[str, Any]) -> dict[str, Any]:
    dropped = ("timeline", "steps", "completed_requests")
    return {k: v for k, v in engine_result.items() if k not in dropped}


# -- the budget sweep (CPU) ----------------------------------------------------------------

SWEEP_KIND = "sim_budgets"


def memory_budgets(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Each ``--memory`` budget as given and in bytes.

    Raises:
        ValueError: a budget that is not a size (one line naming it).
    """
    budgets = []
    for text in args.memory_budgets:
        try:
            budgets.append((text, parse_bytes(text)))
        except ValueError as error:
            raise ValueError(f"--memory: {error}") from None
    return budgets


def calibration_profile(calibration: Path) -> str:
    """The GPU profile of the device a calibration was measured on (its host link
    prices the swaps; ``h100`` for a device that has none).

    Raises:
        ValueError: not a step-time calibration, or no such file.
    """
    from avmp.sim.calibration import load_calibration

    return gpu_profile(load_calibration(calibration).gpu)


def plan_capacity(geometry: Any, budget_bytes: int) -> dict[str, int]:
    """How many requests of `PLAN_PROMPT_TOKENS` + `PLAN_OUTPUT_TOKENS` tokens AVMP,
    unified and static hold at once in ``budget_bytes``, as `avmp plan` counts them
    (the oracle too): none where one such request exceeds the budget."""
    from avmp.memory.planner import plan
    from avmp.memory.spec import MemoryConfig

    if geometry.request_bytes(PLAN_PROMPT_TOKENS + PLAN_OUTPUT_TOKENS) > budget_bytes:
        return dict.fromkeys((*PLAN_LAYOUTS, "oracle"), 0)
    planned = plan(geometry, MemoryConfig(budget_bytes), PLAN_PROMPT_TOKENS, PLAN_OUTPUT_TOKENS,
                   names=PLAN_LAYOUTS)  # fmt: skip
    return {a.name: a.num_requests for a in planned.allocators}


def simulate_budgets(
    args: argparse.Namespace,
    trace: list[RequestSpec],
    budgets: list[tuple[str, int]],
    profile: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Every ``--allocators`` layout simulated over ``trace`` at each budget (and the
    unbounded run once, if asked: its budget does not depend on them), beside each
    budget's `plan_capacity`. No engine runs, so no graph is captured before the run:
    the simulator charges each one where it is first met, and its rates are over the
    makespan less those captures, as in a GPU run."""
    geometry = sim_geometry(args.model)
    results = _sweep_conditions(args, trace, profile) | {
        "sim_geometry": _geometry_figures(geometry), "budgets": [],
    }  # fmt: skip
    layouts = list(dict.fromkeys(args.allocators))
    with _sweep_progress(progress, len(budgets) * len(layouts) + args.unbounded) as advance:
        for text, budget_bytes in budgets:
            sims = {}
            for layout in layouts:
                advance(f"{text} {layout}")
                sims[layout] = _sim_figures(
                    simulate(args, geometry, layout, trace, budget_bytes, profile)
                )
            results["budgets"].append({
                "memory": text, "memory_bytes": budget_bytes,
                "plan": plan_capacity(geometry, budget_bytes), "sim": sims,
            })  # fmt: skip
        if args.unbounded:
            advance("unbounded")
            memory_bytes = unbounded_memory_bytes(geometry, trace, args.max_num_seqs)
            sim = simulate(args, geometry, UNBOUNDED_ALLOCATOR, trace, memory_bytes, profile)
            results["unbounded"] = {
                "allocator": UNBOUNDED_ALLOCATOR, "memory_bytes": memory_bytes,
                "sim": _sim_figures(sim),
            }  # fmt: skip
        advance(None)
    return results


@contextmanager
def _sweep_progress(enabled: bool, total: int) -> Iterator[Callable[[str | None], None]]:
    """A rich progress bar on stderr (gone when done) over the sweep's simulations;
    yields the function that starts the next one under a label (None: all done)."""
    if not enabled:
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("simulating", total=total)
        started = [False]

        def advance(label: str | None) -> None:
            bar.update(task, advance=1 if started[0] else 0, description=label or "done")
            started[0] = True

        yield advance


def _sim_figures(sim: dict[str, Any]) -> dict[str, Any]:
    """A simulated run's figures without its per-step timeline and per-request columns
    (a sweep's results stay small)."""
    return {k: v for k, v in sim.items() if k not in ("timeline", "completed_requests")}


def _sweep_conditions(
    args: argparse.Namespace, trace: list[RequestSpec], profile: str
) -> dict[str, Any]:
    """What a sweep's results record about how they were made."""
    source = {"workload": args.workload, "seed": args.seed} if args.workload else {}
    return {
        "kind": SWEEP_KIND,
        "model": args.model,
        "trace": repo_path(args.trace) if args.trace is not None else None,
        **source,
        "num_requests": len(trace),
        "arrivals": args.arrivals,
        "arrival_span_s": max(r.arrival_s for r in trace),
        "slo": {"ttft_s": args.slo_ttft_s, "tpot_ms": args.slo_tpot_ms},
        "layouts": list(dict.fromkeys(args.allocators)),
        "max_num_seqs": args.max_num_seqs,
        "max_batched_tokens": args.max_batched_tokens,
        "calibration": repo_path(args.calibration),
        "sim_profile": profile,
        "plan_request": {"prompt_tokens": PLAN_PROMPT_TOKENS, "output_tokens": PLAN_OUTPUT_TOKENS},
        "prompt_tokens": sum(r.prompt_tokens for r in trace),
        "output_tokens": sum(r.output_tokens for r in trace),
    }


def budget_ratios(row: dict[str, Any]) -> dict[str, float | None]:
    """AVMP's simulated req/s over each other layout's at one budget of a sweep (None
    where AVMP or that layout was not simulated, or completed nothing)."""
    sims = row["sim"]
    avmp = sims.get("avmp")
    ratios: dict[str, float | None] = {}
    for layout in ("unified", "static", "unified-shipped"):
        other = sims.get(layout)
        usable = avmp is not None and other is not None and other["request_throughput"] > 0
        ratios[layout] = (
            avmp["request_throughput"] / other["request_throughput"] if usable else None
        )
    return ratios


def capacity_gain(row: dict[str, Any]) -> float | None:
    """AVMP's capacity over unified's at one budget of a sweep, less one (`avmp plan`'s
    counts); None where unified holds no such request."""
    counts = row["plan"]
    return counts["avmp"] / counts["unified"] - 1 if counts["unified"] else None


def budget_criteria(row: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 12's engine criteria, here on the simulated figures at one budget: AVMP at
    least unified, at least `MIN_GAIN_OVER_STATIC` x static, and a gain over unified of
    at least half the capacity gain (None where a figure is missing)."""
    ratios, gain = budget_ratios(row), capacity_gain(row)
    over_unified, over_static = ratios["unified"], ratios["static"]
    return {
        "at_least_unified": None if over_unified is None else over_unified >= 1.0,
        "at_least_static": None if over_static is None else over_static >= MIN_GAIN_OVER_STATIC,
        "half_capacity_gain": (
            None if over_unified is None or gain is None else over_unified - 1 >= gain / 2
        ),
    }


def budget_markdown(results: dict[str, Any]) -> str:
    """The table of a budget sweep: one row per budget, simulated req/s per layout,
    AVMP's ratios, `avmp plan`'s capacity and whether each criterion holds."""
    layouts = results["layouts"]
    request = results["plan_request"]
    shape = f"{request['prompt_tokens']} + {request['output_tokens']}"
    lines = [
        _sweep_conditions_line(results),
        "",
        "| budget | " + " | ".join(f"{name} req/s" for name in layouts)
        + " | AVMP / unified | AVMP / static | AVMP / unified-shipped "
        f"| plan ({shape} tokens) AVMP / unified / static | half capacity gain "
        f"| >= 1.00x unified | >= {MIN_GAIN_OVER_STATIC}x static | gain >= half capacity gain |",
        "| --- | " + " | ".join("---:" for _ in layouts) + " | ---: | ---: | ---: | ---: | ---: "
        "| :---: | :---: | :---: |",
    ]
    lines += [_budget_line(layouts, row) for row in results["budgets"]]
    unbounded = results.get("unbounded")
    if unbounded:
        lines.append(
            f"\nUnbounded ({unbounded['allocator']}, {unbounded['memory_bytes'] / 2**30:.2f} GiB: "
            f"the {results['max_num_seqs']} largest requests at once): "
            f"{unbounded['sim']['request_throughput']:.2f} req/s simulated, "
            f"{unbounded['sim']['num_preemptions']} preemptions."
        )
    lines += step_kinds_table(results)
    return "\n".join(lines)


def step_kinds_table(results: dict[str, Any]) -> list[str]:
    """Where each simulated run's step time went (`StepKinds`): decode-only steps and
    their mean decode batch, steps with prefill and their mean prefill tokens, and the
    requests running on average; empty for results saved before these figures."""
    runs = [(row["memory"], name, sim) for row in results["budgets"]
            for name, sim in row["sim"].items()]  # fmt: skip
    if results.get("unbounded"):
        runs.append(("unbounded", results["unbounded"]["allocator"], results["unbounded"]["sim"]))
    runs = [run for run in runs if "step_kinds" in run[2]]
    if not runs:
        return []
    lines = [
        "",
        "Where the simulated step time goes: steps with decode rows only, steps with "
        "prefill tokens (and decode rows beside them), requests running on average.",
        "",
        "| budget | layout | decode steps | s | mean decode rows | prefill steps | s "
        "| mean prefill tokens | mean running |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for budget, name, sim in runs:
        decode, mixed = sim["step_kinds"]["decode"], sim["step_kinds"]["mixed"]
        running = sim.get("mean_running")
        lines.append(
            f"| {budget} | {name} | {decode['steps']} | {decode['seconds']:.1f} "
            f"| {decode['decode_rows'] / max(decode['steps'], 1):.1f} | {mixed['steps']} "
            f"| {mixed['seconds']:.1f} | {mixed['prefill_tokens'] / max(mixed['steps'], 1):,.0f} "
            f"| {'-' if running is None else f'{running:.1f}'} |"
        )
    return lines


def _budget_line(layouts: list[str], row: dict[str, Any]) -> str:
    ratios, gain, criteria = budget_ratios(row), capacity_gain(row), budget_criteria(row)
    counts = row["plan"]
    cells = [
        row["memory"],
        *(f"{row['sim'][name]['request_throughput']:.2f}" for name in layouts),
        *(f"{value:.3f}x" if value is not None else "-" for value in ratios.values()),
        f"{counts['avmp']} / {counts['unified']} / {counts['static']}",
        f"{gain / 2:.1%}" if gain is not None else "-",
        *({True: "yes", False: "no", None: "-"}[held] for held in criteria.values()),
    ]
    return "| " + " | ".join(cells) + " |"


def _sweep_conditions_line(results: dict[str, Any]) -> str:
    if results.get("workload"):
        source = f"workload `{results['workload']}`, seed {results['seed']}"
    else:
        source = f"trace `{results['trace']}`"
    if results["arrivals"] == "zero":
        arriving = "all arriving at t = 0"
    elif results["arrival_span_s"] == 0:
        arriving = "all arriving at t = 0, as the trace says"
    else:
        arriving = f"arriving at the trace's times over {results['arrival_span_s']:.1f} s"
    return (
        f"Simulated on the CPU with the calibration `{results['calibration']}` (GPU profile "
        f"{results['sim_profile']}); model {results['model']} geometry; {source} "
        f"({results['num_requests']} requests, {results['prompt_tokens']} prompt and "
        f"{results['output_tokens']} output tokens, {arriving}); at most "
        f"{results['max_num_seqs']} running, {results['max_batched_tokens']} tokens per step. "
        "Capacity: requests that fit at once as `avmp plan` counts them; half capacity gain: "
        "half of AVMP's over unified's, the least gain in req/s issue 12 asks for."
    )


# -- reporting (anywhere) ------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """The docs' table of a results file: throughput and memory per layout, latency and
    goodput where the results carry per-request times, and the ratios to AVMP; or a
    budget sweep's table (`budget_markdown`)."""
    if results.get("kind") == SWEEP_KIND:
        return budget_markdown(results)
    runs = {run["allocator"]: run for run in results["runs"]}
    # results whose simulator counted captures show its count beside the engine's
    sim_captures = all("num_graph_captures" in run["sim"] for run in runs.values())
    captures_header = "graph captures engine / sim (s)" if sim_captures else "graph capture s"
    lines = [
        _conditions_line(results),
        *_resimulated_lines(results),
        "",
        "| layout | engine req/s | engine out tok/s | preemptions | OOM events "
        "| migrations (chunks to KV / state) | max running | peak state GiB "
        f"| sim req/s (error) | sim preemptions | {captures_header} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        e, s = run["engine"], run["sim"]
        moved = e["chunks_migrated_to"]
        error = s["request_throughput"] / e["request_throughput"] - 1
        lines.append(
            f"| {name} | {e['request_throughput']:.2f} | {e['output_token_throughput']:.0f} | "
            f"{e['num_preemptions']} | {e['num_oom_events']} | "
            f"{e['num_migrations']} ({moved.get('kv', 0)} / {moved.get('state', 0)}) | "
            f"{e['max_running']} | {e['peak_state_capacity_bytes'] / 2**30:.2f} | "
            f"{s['request_throughput']:.2f} ({error:+.0%}) | {s['num_preemptions']} | "
            f"{_captures(e, s) if sim_captures else format(e['graph_capture_s'], '.1f')} |"
        )
    if all("goodput" in run["engine"] for run in runs.values()):  # absent from older results
        lines += ["", *_latency_table(results)]
    if "avmp" in runs:
        lines.append("")
        lines += [_ratio_line(runs["avmp"], run) for name, run in runs.items() if name != "avmp"]
    lines += _notes(results, runs)
    return "\n".join(lines)


def _captures(engine: dict[str, Any], sim: dict[str, Any]) -> str:
    """Graphs captured mid-run, engine / simulator, and the seconds of the steps that
    captured them (capture and run, as the engine times them)."""
    sim_s = sim["graph_capture_s"] + sim.get("captured_steps_s", 0.0)
    return (
        f"{engine['num_graph_captures']} / {sim['num_graph_captures']} "
        f"({engine['graph_capture_s']:.1f} / {sim_s:.1f})"
    )


def _conditions_line(results: dict[str, Any]) -> str:
    if results.get("workload"):
        source = f"workload `{results['workload']}` (seed {results['seed']})"
    else:
        source = f"trace `{results['trace']}`"
    if results.get("arrivals", "zero") == "zero":  # older results replayed all at t = 0
        arriving = "all arriving at t = 0"
    else:
        arriving = f"arriving at the trace's times over {results['arrival_span_s']:.1f} s"
    return (
        f"Device: {results['device']}, torch {results['torch']}; model {results['model']} "
        f"geometry (random bf16 weights); {source} "
        f"({results['runs'][0]['engine']['num_requests']} requests, {results['prompt_tokens']} "
        f"prompt and {results['output_tokens']} output tokens, {arriving}); "
        f"cache budget {results['memory']}, at most "
        f"{results['max_num_seqs']} running, {results['max_batched_tokens']} tokens per step."
    )


def _resimulated_lines(results: dict[str, Any]) -> list[str]:
    """Which calibration the simulated columns used, when they were rerun after the run."""
    again = results.get("resimulated")
    if not again:
        return []
    return [
        "",
        f"Simulated columns rerun on the CPU with the calibration `{again['calibration']}` "
        f"(GPU profile {again['sim_profile']}); the run's own simulation used "
        f"`{again['run_calibration']}`.",
    ]


def _latency_table(results: dict[str, Any]) -> list[str]:
    """TTFT, TPOT and goodput per layout, engine and simulator, and the throughput lost
    to preemption against the unbounded run where there is one."""
    unbounded = results.get("unbounded")
    rows = [*results["runs"], *([unbounded] if unbounded else [])]
    lines = [
        f"Goodput: requests per second that met {SloTargets(**results['slo']).describe()}; "
        "times of the engine are wall times, graph captures included.",
        "",
        "| layout | TTFT p50 / p99 s | TPOT p50 / p99 ms | goodput req/s | sim TTFT p50 / p99 s "
        "| sim TPOT p50 / p99 ms | sim goodput req/s | lost to preemption (engine / sim) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in rows:
        e, s = run["engine"], run["sim"]
        name = run["allocator"] if run is not unbounded else f"unbounded ({run['allocator']})"
        lines.append(
            f"| {name} | {_latencies(e)} | {e['goodput']:.2f} | {_latencies(s)} | "
            f"{s['goodput']:.2f} | {_lost(run, unbounded)} |"
        )
    if unbounded:
        lines.append(
            f"\nUnbounded: {unbounded['memory_bytes'] / 2**30:.2f} GiB of cache (the "
            f"{results['max_num_seqs']} largest requests at once), "
            f"{unbounded['engine']['num_preemptions']} preemptions in the engine, "
            f"{unbounded['sim']['num_preemptions']} simulated."
        )
    return lines


def _latencies(side: dict[str, Any]) -> str:
    return (
        f"{side['ttft_p50_s']:.2f} / {side['ttft_p99_s']:.2f} | "
        f"{side['tpot_p50_s'] * 1e3:.1f} / {side['tpot_p99_s'] * 1e3:.1f}"
    )


def _lost(run: dict[str, Any], unbounded: dict[str, Any] | None) -> str:
    """1 - req/s / the unbounded run's req/s, engine / simulator ('-' without one)."""
    if unbounded is None:
        return "-"
    lost = (
        1 - run[side]["request_throughput"] / unbounded[side]["request_throughput"]
        for side in ("engine", "sim")
    )
    return " / ".join(f"{value:.1%}" for value in lost)


def _ratio_line(avmp: dict[str, Any], other: dict[str, Any]) -> str:
    """AVMP's req/s over ``other``'s, measured and simulated, and goodput's where the
    results have it."""
    measured, predicted = (
        avmp[side]["request_throughput"] / other[side]["request_throughput"]
        for side in ("engine", "sim")
    )
    line = f"- AVMP / {other['allocator']}: {measured:.2f}x measured, {predicted:.2f}x simulated"
    if "goodput" in avmp["engine"] and "goodput" in other["engine"]:
        good = (_ratio(avmp[side]["goodput"], other[side]["goodput"]) for side in ("engine", "sim"))
        line += "; goodput {} measured, {} simulated".format(*good)
    return line + "."


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a (zero goodput)"


def _notes(results: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    lines = []
    unified = runs.get("unified")
    if unified is not None:
        line = (
            f"- unified: {unified['engine']['num_placement_failures']} admissions refused for "
            "want of a whole state group although enough blocks were free (the placed "
            "layout's deviation from vLLM)"
        )
        if "sim_placed" in unified:  # results saved when the simulator's unified pool was exact
            placed = unified["sim_placed"]["request_throughput"]
            exact = unified["sim"]["request_throughput"]
            line += f"; simulated with it: {placed:.2f} req/s ({placed / exact - 1:+.1%})"
        lines.append(line + ".")
    for index, earlier in enumerate(results.get("earlier_rounds", [])):
        figures = ", ".join(
            f"{run['allocator']} {run['request_throughput']:.2f}" for run in earlier
        )
        lines.append(f"- round {index + 1} (compiling Triton variants), req/s: {figures}.")
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6), squeeze=False,
                             sharey="row")  # fmt: skip
    for column, run in enumerate(runs):
        for source, style in (("engine", "-"), ("sim", "--")):
            timeline = run[source]["timeline"]
            t = [p["t_s"] for p in timeline]
            state = [p["state_capacity_bytes"] / 2**30 for p in timeline]
            kv = [p["kv_capacity_bytes"] / 2**30 for p in timeline]
            axes[0][column].plot(t, state, style, color="tab:orange", label=f"state ({source})")
            axes[0][column].plot(t, kv, style, color="tab:blue", label=f"KV ({source})")
            running = [p["num_running"] for p in timeline]
            axes[1][column].plot(t, running, style, color="tab:green", label=source)
        axes[0][column].set_title(run["allocator"])
        axes[1][column].set_xlabel("seconds since the trace started")
    axes[0][0].set_ylabel("pool capacity (GiB)")
    axes[1][0].set_ylabel("running requests")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}, {results['memory']} cache, {results['device']}: "
                 "engine (solid) vs simulator (dashed)", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_trace is not None:
        write_trace(args.write_trace, args.num_requests or WRITE_TRACE_REQUESTS, args.seed)
        return 0
    mistake = _option_mistake(args)
    if mistake is not None:
        print(f"error: {mistake}", file=sys.stderr)
        return 2
    if args.simulate_only:
        return simulate_only(args)
    if args.markdown is not None:
        try:
            results = read_result(args.markdown)
            if args.resimulate is not None:
                results = resimulate(results, args.resimulate, args.trace)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.resimulate is not None and args.out is not None:
            write_result(args.out, results)
        print(markdown(results))
        if args.plot is not None and results.get("kind") == SWEEP_KIND:
            print("error: --plot draws a GPU run's pools; a budget sweep has no timelines",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.plot is not None:
            plot(results, args.plot)
        return 0
    try:  # the user's mistakes, one line each, before the GPU work starts
        memory_budgets(args)
        trace = load_trace(args)
        slo_targets(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_replays(args, trace)
    if args.out is not None:
        write_result(args.out, results)
    print(markdown(results))
    return 0


def _option_mistake(args: argparse.Namespace) -> str | None:
    """The line that explains options that do not go together, or None."""
    if len(args.memory_budgets) > 1 and not args.simulate_only:
        return ("several --memory budgets need --simulate-only (a GPU run replays one "
                "budget: run it once per budget)")  # fmt: skip
    if args.simulate_only and (args.markdown is not None or args.resimulate is not None):
        return ("--simulate-only runs a sweep; --markdown FILE prints a saved one (and "
                "--resimulate reruns a GPU run's): give one")  # fmt: skip
    if args.resimulate is not None and args.markdown is None:
        return "--resimulate needs the results file to rerun: --markdown FILE"
    return None


def simulate_only(args: argparse.Namespace) -> int:
    """``--simulate-only``: the budget sweep on the CPU, saved (``--out``) and printed;
    the user's mistakes are one line each, before any simulation."""
    try:
        budgets = memory_budgets(args)
        trace = load_trace(args)
        slo_targets(args)
        if args.calibration is None:
            args.calibration = default_calibration(sim_profile(args), args.model)
        profile = calibration_profile(args.calibration)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = simulate_budgets(args, trace, budgets, profile, progress=sys.stderr.isatty())
    if args.out is not None:
        write_result(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
