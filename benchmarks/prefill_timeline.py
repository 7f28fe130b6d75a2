"""Where a prefill cell's wall time goes: one ``generate`` of a `benchmarks.prefill` cell
under torch's profiler, on one GPU.

For each model geometry and cell (``PROMPTSxTOKENS@STEP``, the prefill benchmark's cells by
default) the engine runs the cell once to warm up (Triton compilation, graph capture),
``--repeats`` times plainly (the wall times the prefill benchmark would report), then once
more under `torch.profiler` inside a marker. From the trace:

- **device busy**: the union of the kernels' intervals inside the marker; **idle** the
  rest, split into the time before the first kernel (the host's part of the first step:
  the prompt's check, scheduling, packing the step, launching its graph), after the last
  one (the host reading the first tokens back), and the gaps between kernels longer than
  ``--gap-us`` (host work the overlapped steps did not hide);
- **kernels**: device time and launches per kernel name, the largest ``--top`` of them.

The profiler adds its own host cost, so the profiled run's wall time is a little above
the plain runs'; the device's busy time is what the kernels took.

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.prefill_timeline --out $OUT/prefill_timeline.json.gz
    python3 -m benchmarks.prefill_timeline --markdown FILE
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
# benchmarks.prefill's cells (prompts, tokens each, step budget), kept in step with it
# by a test; here so that drawing a saved result imports neither torch nor the engine
DEFAULT_CELLS = ((1, 16384, 8192), (1, 32768, 8192), (8, 4096, 8192), (8, 4096, 16384))
MARKER = "prefill_timeline.generate"
GAP_US = 30.0
TOP = 12
REPEATS = 3
_CELL = re.compile(r"^(\d+)x(\d+)@(\d+)$")


class Span(NamedTuple):
    """One kernel's interval on the device, in microseconds of the trace's clock."""

    start: float
    end: float
    name: str


# -- the trace (pure) --------------------------------------------------------------------


def parse_cell(text: str) -> tuple[int, int, int]:
    """``PROMPTSxTOKENS@STEP`` (``8x4096@8192``) as (prompts, tokens each, step)."""
    match = _CELL.match(text.strip())
    if not match or min(int(g) for g in match.groups()) < 1:
        raise argparse.ArgumentTypeError(
            f"a cell is PROMPTSxTOKENS@STEP with positive numbers (8x4096@8192), got {text!r}")
    prompts, tokens, step = (int(g) for g in match.groups())
    return prompts, tokens, step


def kernel_spans(events: Iterable[dict[str, Any]]) -> list[Span]:
    """The kernels of a Chrome trace (torch's `export_chrome_trace`), by start time."""
    spans = [
        Span(float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e["name"]))
        for e in events
        if e.get("cat") == "kernel" and e.get("ph") == "X"
    ]
    return sorted(spans)


def marker_window(events: Iterable[dict[str, Any]], marker: str = MARKER) -> tuple[float, float]:
    """(start, end) of the host-side range named ``marker``.

    Raises:
        ValueError: the trace has no such range.
    """
    for e in events:
        if e.get("name") == marker and e.get("ph") == "X" and e.get("cat") != "kernel":
            return float(e["ts"]), float(e["ts"]) + float(e["dur"])
    raise ValueError(f"the trace has no range named {marker!r}")


def summarize(spans: Sequence[Span], window: tuple[float, float], gap_us: float = GAP_US,
              top: int = TOP) -> dict[str, Any]:
    """Busy and idle time of the device inside ``window`` (kernels clipped to it), and the
    kernels' time by name (the ``top`` largest, then the rest as one figure).

    Returns:
        ``wall_ms``; ``busy_ms`` (the union of the kernels' intervals); ``before_first_ms``
        and ``after_last_ms`` (idle at the window's ends; the whole window when no kernel
        ran); ``gaps``: the idle intervals between kernels longer than ``gap_us``
        (``count``, ``total_ms``, the five ``largest`` as [offset from the window's start,
        length] in ms); ``kernel_ms`` (the kernels' summed time, overlaps counted twice);
        ``kernels``: [name, ms, launches] by time; ``other_kernels_ms``.
    """
    lo, hi = window
    if hi < lo:
        raise ValueError(f"window ends before it starts: {window}")
    inside = [Span(max(s.start, lo), min(s.end, hi), s.name) for s in spans
              if s.end > lo and s.start < hi]
    busy, gaps = 0.0, []
    run_start = run_end = None
    for span in inside:
        if run_end is None or span.start > run_end:
            if run_end is not None:
                busy += run_end - run_start
                if span.start - run_end > gap_us:
                    gaps.append((run_end - lo, span.start - run_end))
            run_start, run_end = span.start, span.end
        else:
            run_end = max(run_end, span.end)
    if run_end is not None:
        busy += run_end - run_start
    totals: dict[str, list[float]] = {}
    for span in inside:
        entry = totals.setdefault(span.name, [0.0, 0])
        entry[0] += span.end - span.start
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    largest = sorted(gaps, key=lambda g: -g[1])[:5]
    first = inside[0].start if inside else hi
    last = hi if run_end is None else run_end
    return {
        "wall_ms": (hi - lo) / 1e3,
        "busy_ms": busy / 1e3,
        "before_first_ms": (first - lo) / 1e3,
        "after_last_ms": (hi - last) / 1e3,
        "gaps": {
            "threshold_us": gap_us,
            "count": len(gaps),
            "total_ms": sum(g[1] for g in gaps) / 1e3,
            "largest": [[offset / 1e3, length / 1e3] for offset, length in largest],
        },
        "kernel_ms": sum(t for t, _ in totals.values()) / 1e3,
        "kernels": [[name, t / 1e3, int(n)] for name, (t, n) in ranked[:top]],
        "other_kernels_ms": sum(t for _, (t, _) in ranked[top:]) / 1e3,
    }


# -- the runs (GPU) ------------------------------------------------------------------------


def profile_cell(model: Any, geometry: Any, cell: tuple[int, int, int], repeats: int,
                 gap_us: float, top: int) -> dict[str, Any]:
    """The cell's plain wall times and its profiled run's summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.engine import random_prompts
    from benchmarks.prefill import cache_budget, engine_for, timed_generate

    prompts, tokens, step = cell
    engine = engine_for(model, cache_budget(geometry, prompts, tokens), step, prompts)
    vocab = geometry.vocab_size
    try:
        engine.generate(random_prompts(prompts, tokens, vocab, 1), 1, ignore_eos=True)
        plain = [timed_generate(engine, random_prompts(prompts, tokens, vocab, 2 + i), 1)
                 for i in range(repeats)]
        batch = random_prompts(prompts, tokens, vocab, 2 + repeats)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function(MARKER):
                engine.generate(batch, 1, ignore_eos=True)
            torch.cuda.synchronize()
    finally:
        engine.backing.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    summary = summarize(kernel_spans(events), marker_window(events), gap_us, top)
    return {"prompts": prompts, "tokens": tokens, "step": step, "plain_s": plain, **summary}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.engine import build_model, transformers_config
    from benchmarks.prefill import engine_for

    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "repeats": args.repeats, "models": []}
    for name in args.models:
        model = build_model(transformers_config(name), torch.device("cuda"))
        probe = engine_for(model, 256 << 20, 1024, 1)
        geometry = probe.geometry
        probe.backing.close()
        cells = []
        for cell in args.cells:
            row = profile_cell(model, geometry, cell, args.repeats, args.gap_us, args.top)
            print(f"{name} {cell_label(cell)}: busy {row['busy_ms']:.1f} of "
                  f"{row['wall_ms']:.1f} ms, first kernel after {row['before_first_ms']:.2f} ms",
                  flush=True)
            cells.append(row)
        result["models"].append({"model": name, "cells": cells})
        del model
        torch.cuda.empty_cache()
    return result


# -- report -----------------------------------------------------------------------------------


def cell_label(cell: Sequence[int]) -> str:
    prompts, tokens, step = cell
    return f"{prompts} x {tokens:,}, {step:,}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['gpu']}, torch {result['torch']}: one profiled `generate` per cell (one "
        f"token per prompt) after a warm-up and {result['repeats']} plain runs.",
        "",
        "| model geometry | prompts x tokens, step | plain s (median) | profiled ms | "
        "device busy ms | before the first kernel ms | gaps between kernels | "
        "after the last kernel ms |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]  # fmt: skip
    for model in result["models"]:
        for c in model["cells"]:
            gaps = c["gaps"]
            lines.append(
                f"| {model['model']} | {cell_label((c['prompts'], c['tokens'], c['step']))} "
                f"| {statistics.median(c['plain_s']):.3f} | {c['wall_ms']:.1f} "
                f"| {c['busy_ms']:.1f} ({100 * c['busy_ms'] / c['wall_ms']:.0f}%) "
                f"| {c['before_first_ms']:.2f} "
                f"| {gaps['count']} over {gaps['threshold_us']:.0f} us, {gaps['total_ms']:.2f} ms "
                f"| {c['after_last_ms']:.2f} |"
            )
    for model in result["models"]:
        for c in model["cells"]:
            label = cell_label((c["prompts"], c["tokens"], c["step"]))
            lines += ["", f"{model['model']}, {label}: device time by kernel", "",
                      "| kernel | ms | launches | share of busy |", "|---|---:|---:|---:|"]
            for name, ms, calls in c["kernels"]:
                lines.append(f"| `{name[:80]}` | {ms:.2f} | {calls} "
                             f"| {100 * ms / c['busy_ms']:.1f}% |")
            lines.append(f"| (the others) | {c['other_kernels_ms']:.2f} | | |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="print the tables of a results file")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--cells", nargs="+", type=parse_cell, metavar="PxT@S",
                        default=list(DEFAULT_CELLS),
                        help="PROMPTSxTOKENS@STEP (default: benchmarks.prefill's cells)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="plain runs per cell")
    parser.add_argument("--gap-us", type=float, default=GAP_US,
                        help="idle between kernels counted as a gap above this")
    parser.add_argument("--top", type=int, default=TOP, help="kernels listed per cell")
    args = parser.parse_args(argv)
    for name in ("repeats", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.gap_us < 0:
        parser.error("--gap-us must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import measure_or_redraw

    args = parse_args(argv)
    return measure_or_redraw(args, "benchmarks.prefill_timeline", lambda: run(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
