"""A ShareGPT sample replayed through the engine on real GPU memory, once per layout
(AVMP, SGLang's static split, vLLM's unified pool; same model, same kernels), beside the
simulator's prediction for the same trace.

The trace: ``--write-trace`` samples ``--num-requests`` ShareGPT conversations under vLLM's
rules (real prompt and output lengths, Mistral's tokenizer), all arriving at t = 0 (an
offline replay: the queue is full from the start, so memory decides the batch). It is
written once here and committed, since the GPU machine has neither the dataset nor the
tokenizer. Prompts are random token ids of those lengths; every request generates exactly
its output length (``ignore_eos``).

Per layout the engine runs the whole trace with the Triton kernels and decode CUDA
graphs, AVMP and static on the CUDA VMM backing (chunks mapped as the pools grow),
unified on one plain buffer (as vLLM allocates it); a budget small enough that memory,
not ``--max-num-seqs``, limits the batch. Steps are profiled with CUDA events (no sync:
steps still overlap, as in benchmarks/engine.py); steps that captured a CUDA graph are
one-off work and reported apart. The layouts are replayed ``--rounds`` times in turn and the
last round is reported: the first pays Triton's compilation of the kernel variants the
trace's shapes need, which would otherwise fall on whichever layout runs first. The
simulator replays the same trace with the same scheduler limits and allocator, its clock
from the step-time calibration of benchmarks/engine.py.

Usage::

    python -m benchmarks.engine_replay --write-trace benchmarks/traces/sharegpt_vllm_600.jsonl
    PYTHONPATH=src python3 -m benchmarks.engine_replay \\
        --trace benchmarks/traces/sharegpt_vllm_600.jsonl --out $OUT/engine_replay_h100.json.gz
    python -m benchmarks.engine_replay --markdown benchmarks/results/engine_replay_h100.json.gz \\
        --plot docs/figures/engine_replay_h100.png
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, read_result, repo_path, write_result

DEFAULT_MODEL = "granite-4.0-h-micro"
ALLOCATORS = ("avmp", "static", "unified")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-trace", type=Path, help="sample ShareGPT into this JSONL trace")
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, help="JSONL trace to replay (on the GPU)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo geometry, random weights")
    parser.add_argument("--memory", default="3GiB", help="cache budget of each layout")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
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
    return parser.parse_args(argv)


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


# -- the replay (GPU) ------------------------------------------------------------------------


def replay(args: argparse.Namespace, model: Any, allocator: str, trace: list[Any]) -> dict:
    """The engine over the whole trace on one layout; its figures and pool timeline."""
    import torch

    from avmp.engine.engine import Engine, EngineConfig
    from avmp.engine.fast_runner import FastModelRunner
    from avmp.units import parse_bytes

    on_gpu = args.device == "cuda"
    vmm = on_gpu and args.backing == "vmm" and allocator != "unified"
    config = EngineConfig(
        memory_bytes=parse_bytes(args.memory), device=args.device,
        kernels="triton" if on_gpu else "reference", allocator=allocator,
        backing="cuda_vmm" if vmm else "torch",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
    )  # fmt: skip
    engine = Engine(model, config)
    runner = engine.runner
    profiled = isinstance(runner, FastModelRunner)  # the reference runner (CPU) has no profile
    rng = np.random.default_rng(args.seed)
    vocab = engine.geometry.vocab_size
    prompts = [rng.integers(3, vocab, size=r.prompt_tokens).tolist() for r in trace]
    limits = [r.output_tokens for r in trace]
    if profiled:
        runner.profile.start()
    outputs = engine.generate(prompts, max_tokens=limits, ignore_eos=True)
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
        # per profiled step: prefill tokens, decode requests, context tokens, requests,
        # period (start to next start), runner seconds, graph replayed, graph captured
        "steps": [
            [s.num_prefill_tokens, s.num_decode_requests, s.num_context_tokens,
             s.num_requests, b.started - s.started, s.seconds, s.graph, s.captured]
            for s, b in zip(steps, steps[1:], strict=False)
        ],  # fmt: skip
    }
    engine.backing.close()
    del engine, runner
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def warm_up(args: argparse.Namespace, model: Any) -> None:
    """Compile every kernel variant once (chunked prefill, decode, mixed steps), so
    that no layout's timed run pays Triton's compilation."""
    from avmp.engine.engine import Engine, EngineConfig

    on_gpu = args.device == "cuda"
    config = EngineConfig(1 << 30, device=args.device,
                          kernels="triton" if on_gpu else "reference", max_num_seqs=16,
                          max_num_batched_tokens=args.max_batched_tokens)  # fmt: skip
    engine = Engine(model, config)
    rng = np.random.default_rng(args.seed + 1)
    vocab = engine.geometry.vocab_size
    lengths = [7, 300, 40, 1500, 12, 700, 3, 90] * 2
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    engine.generate(prompts, max_tokens=[4, 9, 2, 5, 16, 3, 8, 6] * 2, ignore_eos=True)
    engine.backing.close()


def simulate(
    args: argparse.Namespace, geometry: Any, allocator: str, trace: list[Any]
) -> dict:
    """The simulator's prediction for the same trace, limits, budget and layout (the
    simulator's unified layout is the engine's, deviation included)."""
    from avmp.memory.registry import make_allocator
    from avmp.memory.spec import MemoryConfig
    from avmp.sim.simulator import SimConfig
    from avmp.sim.simulator import simulate as run_sim
    from avmp.units import parse_bytes

    config = SimConfig(
        profile="h100", calibration=str(args.calibration), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
    )  # fmt: skip
    memory = MemoryConfig(parse_bytes(args.memory))
    layout = make_allocator(allocator, geometry, memory)
    result = run_sim(trace, layout, geometry, config)
    keys = ("makespan_s", "request_throughput", "output_token_throughput", "num_preemptions",
            "num_completed", "num_rejected", "num_steps", "allocator_stats", "timeline",
            "phase_s", "time_model")  # fmt: skip
    return {key: getattr(result, key) for key in keys}


def run_replays(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from avmp.bench.traces import read_trace
    from avmp.models.geometry import ConvColumns
    from benchmarks.engine import build_model, transformers_config

    trace = read_trace(args.trace)
    if args.calibration is None:
        args.calibration = RESULTS_DIR / f"calibration_h100_{args.model}.json"
    on_gpu = args.device == "cuda"
    model = build_model(transformers_config(args.model), torch.device(args.device))
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "trace": repo_path(args.trace),
        "memory": args.memory,
        "backing": args.backing,
        "max_num_seqs": args.max_num_seqs,
        "max_batched_tokens": args.max_batched_tokens,
        "calibration": repo_path(args.calibration),
        "prompt_tokens": sum(r.prompt_tokens for r in trace),
        "output_tokens": sum(r.output_tokens for r in trace),
        "runs": [],
    }
    # the geometry the engine sees (bf16 state, vLLM's conv columns), for the simulator
    geometry = model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)
    geometry = dataclasses.replace(geometry, name=args.model)  # the calibration's name
    warm_up(args, model)
    results["earlier_rounds"] = []
    for round_index in range(args.rounds):
        runs = []
        for allocator in args.allocators:
            start = time.perf_counter()
            engine_result = replay(args, model, allocator, trace)
            sim_result = simulate(args, geometry, allocator, trace)
            run = {"allocator": allocator, "engine": engine_result, "sim": sim_result}
            runs.append(run)
            print(
                f"round {round_index + 1}, {allocator}: engine "
                f"{engine_result['request_throughput']:.2f} req/s "
                f"({engine_result['num_preemptions']} preemptions, "
                f"{engine_result['num_migrations']} migrations), sim "
                f"{sim_result['request_throughput']:.2f} req/s; "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
        if round_index + 1 < args.rounds:  # kept small: figures, no timelines or steps
            results["earlier_rounds"].append([_summary(run["engine"]) for run in runs])
        results["runs"] = runs
    return results


def _summary(engine_result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in engine_result.items() if k not in ("timeline", "steps")}


# -- reporting (anywhere) ------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    runs = {run["allocator"]: run for run in results["runs"]}
    num_requests = results["runs"][0]["engine"]["num_requests"]
    lines = [
        f"Device: {results['device']}, torch {results['torch']}; model {results['model']} "
        f"geometry (random bf16 weights); trace `{results['trace']}` "
        f"({num_requests} requests, {results['prompt_tokens']} prompt and "
        f"{results['output_tokens']} output tokens, all arriving at t = 0); "
        f"cache budget {results['memory']}, at most "
        f"{results['max_num_seqs']} running, {results['max_batched_tokens']} tokens per step.",
        "",
        "| layout | engine req/s | engine out tok/s | preemptions | OOM events "
        "| migrations (chunks to KV / state) | max running | peak state GiB "
        "| sim req/s (error) | sim preemptions | graph capture s |",
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
            f"{e['graph_capture_s']:.1f} |"
        )
    if "avmp" in runs:
        lines.append("")
        for name in (n for n in runs if n != "avmp"):
            measured, predicted = (
                runs["avmp"][side]["request_throughput"] / runs[name][side]["request_throughput"]
                for side in ("engine", "sim")
            )
            lines.append(f"- AVMP / {name}: {measured:.2f}x measured, {predicted:.2f}x simulated.")
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
    return "\n".join(lines)


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_trace is not None:
        write_trace(args.write_trace, args.num_requests, args.seed)
        return 0
    if args.markdown is not None:
        results = read_result(args.markdown)
        print(markdown(results))
        if args.plot is not None:
            plot(results, args.plot)
        return 0
    if args.trace is None:
        print("give --trace (replay on the GPU), --write-trace or --markdown", file=sys.stderr)
        return 2
    results = run_replays(args)
    if args.out is not None:
        write_result(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
