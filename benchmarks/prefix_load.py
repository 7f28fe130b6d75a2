"""Time to first token with and without the prefix cache as the offered load rises, in
the simulator, beside the engine's runs of `benchmarks/prefix_engine.py` when given.

A prefix hit saves prefill; how much of that reaches TTFT depends on the load. Below
saturation a later turn without the cache waits about one step more for its history, so
a hit cannot cut TTFT by more than a step or two; near the uncached engine's capacity the
cache's saved prefill is the difference between a queue that drains and one that grows.
One point per load is one replay of a workload preset (the engine benchmark's: arrivals
multiplied by ``--arrival-scales``, lower is denser) without and with the cache, on
AVMP's pools, with the engine benchmark's defaults (Granite-4.0-H-Micro, 8 GiB, 64
running requests, 8,192 tokens per step), a step-time calibration measured on an H200,
and steps planned while the previous one runs, as the engine plans them
(`SimConfig.overlap`). Reported per load: offered req/s, TTFT p50 and p99 off / on and
their ratio, req/s off / on, and the token hit rate against the ideal.

    python -m benchmarks.prefix_load                      # ~40 s on one CPU core
    python -m benchmarks.prefix_load --engine R1.json.gz R2.json.gz --plot load.png
    python -m benchmarks.prefix_load --markdown benchmarks/results/prefix_load.json.gz

``--engine`` takes results files of `benchmarks/prefix_engine.py` (any arrival scale,
AVMP's pools with and without the cache) and puts their TTFTs beside the simulated ones
of the same workload and scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from avmp.sched.request import RequestSpec
from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    read_result,
    repo_path,
    save_figure,
    write_result,
)

DEFAULT_OUT = RESULTS_DIR / "prefix_load.json.gz"
CALIBRATION = RESULTS_DIR / "calibration_h200_s11_physical_granite-4.0-h-micro.json.gz"
WORKLOADS = ("multi_turn_prefix", "sharegpt_multi_turn")
NUM_REQUESTS = 384  # 243 later turns of multi_turn_prefix at seed 0 (session 14's engine run)
ARRIVAL_SCALES = (1.0, 0.5, 0.35, 0.25, 0.2, 0.15, 0.1)
MODEL = "granite-4.0-h-micro"  # the engine benchmark's defaults
MEMORY = "8GiB"
MAX_NUM_SEQS = 64
MAX_BATCHED_TOKENS = 8192
PROFILE = "h200"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        help=f"prefix workload presets (default {' '.join(WORKLOADS)})")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arrival-scales", nargs="+", type=float, default=list(ARRIVAL_SCALES),
                        metavar="X", help="multiply the arrival times by each (lower: denser)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--memory", default=MEMORY)
    parser.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    parser.add_argument("--max-batched-tokens", type=int, default=MAX_BATCHED_TOKENS)
    parser.add_argument("--profile", default=PROFILE)
    parser.add_argument("--calibration", type=Path, default=CALIBRATION,
                        help="step-time calibration (default: session 11's on an H200)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="plan between steps instead of while the previous step runs")
    parser.add_argument("--engine", nargs="+", type=Path, default=[], metavar="FILE",
                        help="results of benchmarks/prefix_engine.py to show beside")
    parser.add_argument("--out", type=Path, help=f"results file (default {repo_path(DEFAULT_OUT)})")
    parser.add_argument("--markdown", type=Path, help="print the table of a results file")
    parser.add_argument("--plot", type=Path, help="draw TTFT p50 against the offered load here")
    return parser.parse_args(argv)  # fmt: skip


def _mistake(args: argparse.Namespace) -> str | None:
    from avmp.bench.workloads import PREFIX_PRESETS

    if args.markdown is not None:
        return None if args.markdown.is_file() else f"no results file {args.markdown}"
    unknown = [w for w in args.workloads if w not in PREFIX_PRESETS]
    if unknown:
        return f"unknown workload {unknown[0]!r}; known: {', '.join(PREFIX_PRESETS)}"
    if args.num_requests < 1:
        return f"--num-requests must be >= 1, got {args.num_requests}"
    if any(not scale > 0 for scale in args.arrival_scales):
        return "--arrival-scales must be > 0"
    if not args.calibration.is_file():
        return f"no calibration file {args.calibration}"
    missing = [path for path in args.engine if not path.is_file()]
    return f"no results file {missing[0]}" if missing else None


def scaled(specs: list[RequestSpec], scale: float) -> list[RequestSpec]:
    """``specs`` with their arrival times multiplied by ``scale``."""
    return [
        RequestSpec(s.request_id, s.arrival_s * scale, s.prompt_tokens, s.output_tokens,
                    s.segments, s.output_segment)  # fmt: skip
        for s in specs
    ]


def offered_rate(specs: list[RequestSpec]) -> float:
    """Requests per second over the span of the arrivals (turns held for their parents'
    answers arrive later than this counts: it is the client's intended rate)."""
    times = [spec.arrival_s for spec in specs]
    span = max(times) - min(times)
    return (len(specs) - 1) / span if span > 0 else float("inf")


def simulate_point(args: argparse.Namespace, specs: list[RequestSpec], prefix_cache: str
                   ) -> dict[str, Any]:  # fmt: skip
    from avmp.memory.registry import make_allocator
    from avmp.memory.spec import MemoryConfig
    from avmp.models import resolve_model
    from avmp.sim.simulator import SimConfig, simulate
    from avmp.units import parse_bytes

    geometry = resolve_model(args.model)
    config = SimConfig(
        profile=args.profile, calibration=str(args.calibration), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, prefix_cache=prefix_cache,
        overlap=not args.no_overlap, timeline_samples=0,
    )  # fmt: skip
    allocator = make_allocator("avmp", geometry, MemoryConfig(parse_bytes(args.memory)))
    result = simulate(specs, allocator, geometry, config)
    row = {key: getattr(result, key) for key in (
        "ttft_p50_s", "ttft_p99_s", "request_throughput", "num_completed", "num_preemptions")}
    if result.prefix:
        row["hit_of_ideal"] = result.prefix["hit_rate_vs_ideal"]
    return row  # fmt: skip


def run(args: argparse.Namespace, engine: list[dict[str, Any]]) -> dict[str, Any]:
    from avmp.bench.workloads import make_prefix_workload

    points = []
    for workload in args.workloads:
        base = make_prefix_workload(workload, args.seed, args.num_requests, progress=True)
        for scale in args.arrival_scales:
            specs = scaled(base, scale)
            off, on = (simulate_point(args, specs, cache) for cache in ("off", "avmp"))
            point = {"workload": workload, "arrival_scale": scale,
                     "offered_rps": offered_rate(specs), "off": off, "on": on}  # fmt: skip
            points.append(point)
            print(_progress_line(point), flush=True)
    return {
        "model": args.model, "memory": args.memory, "profile": args.profile,
        "calibration": repo_path(args.calibration), "overlap": not args.no_overlap,
        "max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
        "num_requests": args.num_requests, "seed": args.seed, "points": points,
        "engine": engine,
    }  # fmt: skip


def _progress_line(point: dict[str, Any]) -> str:
    off, on = point["off"], point["on"]
    return (f"{point['workload']} x{point['arrival_scale']:g} "
            f"({point['offered_rps']:.1f} req/s offered): TTFT p50 "
            f"{off['ttft_p50_s'] * 1e3:.1f} -> {on['ttft_p50_s'] * 1e3:.1f} ms "
            f"({_ratio(off['ttft_p50_s'], on['ttft_p50_s'])}), req/s "
            f"{off['request_throughput']:.2f} -> {on['request_throughput']:.2f}")  # fmt: skip


def engine_points(paths: list[Path]) -> list[dict[str, Any]]:
    """From each `prefix_engine` results file, per workload, AVMP's pools without and with
    the cache: TTFT p50 / p99 and req/s, with the file's device and arrival scale."""
    points = []
    for path in paths:
        results = read_result(path)
        if not isinstance(results, dict) or results.get("mode") == "identity" or (
            "runs" not in results
        ):
            raise ValueError(f"{path}: not a timed run of benchmarks/prefix_engine.py")
        runs = [run for run in results["runs"] if run["allocator"] == "avmp"]
        for workload in dict.fromkeys(run["workload"] for run in runs):
            pair = {run["prefix_cache"] != "off": run for run in runs
                    if run["workload"] == workload}  # fmt: skip
            if len(pair) < 2:
                continue
            points.append({
                "file": repo_path(path), "device": results["device"], "workload": workload,
                "arrival_scale": results["arrival_scale"],
                "num_requests": pair[False]["num_requests"],
                "off": _engine_row(pair[False]), "on": _engine_row(pair[True]),
            })  # fmt: skip
    return points


def _engine_row(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run[key] for key in ("ttft_p50_s", "ttft_p99_s", "request_throughput")}


def _ratio(off: float, on: float) -> str:
    return f"{off / on:.2f}x" if on > 0 else "-"


def markdown(results: dict[str, Any]) -> str:
    r = results
    plan = "planned while the previous step runs" if r["overlap"] else "planned between steps"
    lines = [
        f"{r['model']}, {r['memory']} cache on AVMP's pools, max_num_seqs {r['max_num_seqs']}, "
        f"{r['max_batched_tokens']} batched tokens, {r['num_requests']} requests, seed "
        f"{r['seed']}; simulated on {r['profile']} with `{r['calibration']}`, steps {plan}.",
        "",
        "| workload | arrivals | offered req/s | TTFT p50 off / on | ratio | TTFT p99 off / on "
        "| ratio | req/s off / on | hit / ideal | engine TTFT p50 off / on (ratio) |",
        "|---|---:|---:|---|---:|---|---:|---|---:|---|",
    ]
    for point in r["points"]:
        off, on = point["off"], point["on"]
        hit = on.get("hit_of_ideal")
        lines.append(
            f"| {point['workload']} | x{point['arrival_scale']:g} | {point['offered_rps']:.1f} "
            f"| {_ms(off['ttft_p50_s'])} / {_ms(on['ttft_p50_s'])} "
            f"| {_ratio(off['ttft_p50_s'], on['ttft_p50_s'])} "
            f"| {_ms(off['ttft_p99_s'])} / {_ms(on['ttft_p99_s'])} "
            f"| {_ratio(off['ttft_p99_s'], on['ttft_p99_s'])} "
            f"| {off['request_throughput']:.2f} / {on['request_throughput']:.2f} "
            f"| {'-' if hit is None else f'{hit:.1%}'} | {_engine_cell(r, point)} |"
        )
    for point in r["engine"]:
        if not _simulated(r, point):
            lines.append(f"\nEngine only (no simulated point at its scale): {_engine_text(point)}")
    devices = sorted({point["device"] for point in r["engine"]})
    if devices:
        lines += ["", f"Engine columns: `benchmarks/prefix_engine.py` on {', '.join(devices)} "
                      f"({', '.join(sorted({p['file'] for p in r['engine']}))})."]  # fmt: skip
    return "\n".join(lines)


def _simulated(results: dict[str, Any], engine: dict[str, Any]) -> bool:
    return any(_same_point(p, engine) for p in results["points"])


def _same_point(simulated: dict[str, Any], engine: dict[str, Any]) -> bool:
    return (simulated["workload"] == engine["workload"]
            and abs(simulated["arrival_scale"] - engine["arrival_scale"]) < 1e-9)  # fmt: skip


def _engine_cell(results: dict[str, Any], point: dict[str, Any]) -> str:
    cells = [_engine_text(e) for e in results["engine"] if _same_point(point, e)
             and e["num_requests"] == results["num_requests"]]  # fmt: skip
    return "; ".join(cells) or "-"


def _engine_text(engine: dict[str, Any]) -> str:
    off, on = engine["off"]["ttft_p50_s"], engine["on"]["ttft_p50_s"]
    return f"{_ms(off)} / {_ms(on)} ({_ratio(off, on)})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(p["workload"] for p in results["points"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4),
                             squeeze=False)  # fmt: skip
    for axis, workload in zip(axes[0], workloads, strict=True):
        points = sorted((p for p in results["points"] if p["workload"] == workload),
                        key=lambda p: p["offered_rps"])  # fmt: skip
        rate = [p["offered_rps"] for p in points]
        for key, color, label in (("off", "tab:red", "no cache"), ("on", "tab:blue", "cache")):
            ttft = [p[key]["ttft_p50_s"] * 1e3 for p in points]
            axis.plot(rate, ttft, "o--", color=color, label=f"{label} (simulated)")
            engine = [(p["offered_rps"], e[key]["ttft_p50_s"] * 1e3) for p in points
                      for e in results["engine"] if _same_point(p, e)]  # fmt: skip
            if engine:
                axis.plot(*zip(*engine, strict=True), "s", color=color, markersize=8,
                          label=f"{label} (engine)")  # fmt: skip
        axis.set_yscale("log")
        axis.set_xlabel("offered requests / s")
        axis.set_ylabel("TTFT p50 (ms)")
        axis.set_title(workload)
        axis.legend(fontsize=7)
    fig.suptitle(f"{results['model']}, {results['memory']}:\nTTFT with and without the "
                 "prefix cache as the load rises", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mistake = _mistake(args)
    if mistake is not None:
        print(f"error: {mistake}", file=sys.stderr)
        return 2
    try:
        engine = engine_points(args.engine)
    except (ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.markdown is not None:
        results = read_result(args.markdown)
        results["engine"] = engine or results.get("engine", [])
    else:
        results = run(args, engine)
        out = write_result(args.out or DEFAULT_OUT, results)
        print(f"wrote {out}", file=sys.stderr)
    print(markdown(results))
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
