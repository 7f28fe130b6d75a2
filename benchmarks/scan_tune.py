"""Tune the chunked Mamba2 scan's launch tiles (`ScanTiles`) on a CUDA GPU, kernel by kernel.

Geometries: Granite-4.0-H-Micro and Nemotron-H-8B, read from their zoo configs (chunk
size, heads, head_dim, d_state, groups); bf16 activations, the family's SSM-state dtype,
called as the engine calls the scan (D, dt_bias, rounded dt, states continuing from their
slots, the chunk table built once). Steps of 8,192 tokens: one prompt of 8,192 and eight
of 1,024.

Per geometry, each of the five kernels (or those of ``--kernels``) is swept alone (the
others keep their defaults), costliest first, over a bounded grid in two phases: (1) its
tile sizes, each from {32, 64, 128} where it divides the dimension (chunk, head_dim,
d_state; the chunk scan's rows and its walk over their chunk both take the chunk's) and
fits in it (heads per program from {4, 8, 16} for the dt cumsum; state elements from
{128 ... 4096} x prefetch depth {1, 2} for the state passing), at the default 4 warps and
3 stages, beside the tiles the packaged table holds for this GPU (timed whatever the
budget, so a sweep cut short keeps them); (2) warps {4, 8} x stages {1, 2, 3} around
phase 1's fastest (warps alone for the dt cumsum, and {2, 4, 8} alone for the state
passing: Triton pipelines neither's loop, so stages change nothing). A candidate whose
staged operands cannot fit in the GPU's shared memory is pruned before it compiles; one
that fails to compile or launch is recorded and skipped; one whose whole-scan output or final state
differs from the default configuration's by more than `MATCH_TOLERANCE` (relative) is
rejected. Times:
the kernel's launch alone (the launches before it have run once), CUDA events around
`CALLS_PER_EVENT` back-to-back calls, median after warm-up, summed over both steps. Per
kernel the fastest candidate wins; then the whole scan runs with the default and the tuned
tiles side by side.

After ``--budget-s`` seconds of sweeping (shared evenly by the geometries, what one leaves
passing to the next), the candidates left are skipped (counted in the results) and those
kernels keep their best so far.

    PYTHONPATH=src python3 -m benchmarks.scan_tune --out $OUT/scan_tune_h200.json.gz \\
        --write-table $OUT/mamba2_chunk_scan.json
    python3 -m benchmarks.scan_tune --markdown benchmarks/results/scan_tune_h200.json.gz

``--write-table PATH`` writes the package's tuned table (src/avmp/kernels/triton/tuned/
mamba2_chunk_scan.json) with this GPU's entries for the swept shapes replaced by this
run's: copy it over the packaged file to ship it (with ``--kernels``, the kernels not
swept keep the tiles the packaged table had).

One kernel alone, then its candidates one row each; and the code path on the CPU::

    PYTHONPATH=src python3 -m benchmarks.scan_tune --kernels state_passing \\
        --out $OUT/scan_tune_state_passing_h200.json.gz
    python3 -m benchmarks.scan_tune --markdown FILE --trials state_passing
    TRITON_INTERPRET=1 PYTHONPATH=src python3 -m benchmarks.scan_tune --smoke --out /tmp/s.json.gz

The sweep lives in `benchmarks.scan_tune_measure`, imported only to sweep: it needs Triton,
which drawing a saved result's tables (``--markdown FILE``) does not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import tuning

MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
STEPS = ((1, 8192), (8, 1024))  # (prompts, tokens each): 8,192 tokens per step


# -- report --------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """The tables of a saved result: per kernel before / after, then the whole scan."""
    lines = [f"{result['device']}, torch {result['torch']}, Triton {result['triton']}; "
             f"{result['elapsed_s']:.0f} s; times: {result['timing']}.", ""]
    steps = result["geometries"][0]["steps"] if result["geometries"] else []
    lines.append("| model geometry | kernel | default tiles | tuned tiles | "
                 + " | ".join(f"{s} ms before / after" for s in steps)
                 + " | candidates ok / tried |")
    lines.append("|---|---|---|---|" + "---:|" * len(steps) + "---:|")
    for g in result["geometries"]:
        for k in g["kernels"]:
            tried = [t for t in g["trials"] if t["kernel"] == k["kernel"]]
            ok = sum(t["error"] is None for t in tried)
            times = " | ".join(f"{a:.3f} / {b:.3f}"
                               for a, b in zip(k["default_ms"], k["tuned_ms"], strict=True))
            lines.append(f"| {g['model']} | {k['kernel']} | {k['default']} | {k['tuned']} | "
                         f"{times} | {ok} / {len(tried)} |")
    lines += ["", "| model geometry | step | whole scan default ms | tuned ms | speed-up | "
              "rel err vs default | candidates skipped (budget) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for g in result["geometries"]:
        for w in g["whole"]:
            lines.append(f"| {g['model']} | {w['step']} | {w['default_ms']:.3f} | "
                         f"{w['tuned_ms']:.3f} | {w['speedup']:.2f}x | {w['rel_error']:.1e} | "
                         f"{g['skipped']} |")
    return "\n".join(lines)


def trials_markdown(result: dict[str, Any], kernel: str) -> str:
    """One kernel's candidates in a saved result, as swept: each one's time per step, or
    why it was dropped.

    Raises:
        ValueError: ``kernel`` is none of the result's kernels.
    """
    known = list(dict.fromkeys(k["kernel"] for g in result["geometries"] for k in g["kernels"]))
    if kernel not in known:
        raise ValueError(f"--trials {kernel}: the result's kernels are {', '.join(known)}")
    steps = result["geometries"][0]["steps"] if result["geometries"] else []
    lines = [f"| model geometry | {kernel} tiles | " + " | ".join(f"{s} ms" for s in steps)
             + " | rel err vs default | dropped |",
             "|---|---|" + "---:|" * len(steps) + "---:|---|"]
    for g in result["geometries"]:
        for t in (t for t in g["trials"] if t["kernel"] == kernel):
            times = t["ms"] or [None] * len(steps)
            shown = " | ".join("-" if ms is None else f"{ms:.3f}" for ms in times)
            err = "-" if t["rel_error"] is None else f"{t['rel_error']:.1e}"
            lines.append(f"| {g['model']} | {t['label']} | {shown} | {err} | "
                         f"{t['error'] or ''} |")
    return "\n".join(lines)


def parse_steps(text: str) -> tuple[int, int]:
    batch, _, each = text.partition("x")
    try:
        step = int(batch), int(each)
    except ValueError:
        step = (0, 0)
    if min(step) < 1:
        raise argparse.ArgumentTypeError(f"a step is PROMPTSxTOKENS (positive), got {text!r}")
    return step


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = tuning.tuner_parser(
        (__doc__ or "").splitlines()[0], models=MODELS, budget_s=100.0,
        markdown_help="print the tables of a saved result",
        smoke_help="a tiny shape on the CPU under TRITON_INTERPRET=1 (a code-path check)")
    parser.add_argument("--steps", nargs="+", type=parse_steps, default=list(STEPS),
                        metavar="PROMPTSxTOKENS", help="steps to time (default 1x8192 8x1024)")
    # No choices: the kernels' names (SCAN_KERNELS) come with Triton. The sweep checks
    # --kernels against them, `trials_markdown` --trials against the saved result's.
    parser.add_argument("--kernels", nargs="+", metavar="KERNEL",
                        help="the kernels to sweep (the others keep their defaults)")
    parser.add_argument("--trials", metavar="KERNEL",
                        help="with --markdown: that kernel's candidates, one row each")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def saved(result: dict[str, Any]) -> str:
        return markdown(result) if args.trials is None else trials_markdown(result, args.trials)

    def sweep_steps() -> tuning.SweepSteps:
        from benchmarks import scan_tune_measure  # imports Triton: only a sweep needs it

        return scan_tune_measure.sweep_steps(args, argv)

    return tuning.tuner_main("scan_tune", args, tuning.TunerSteps(saved, markdown, sweep_steps))


if __name__ == "__main__":
    raise SystemExit(main())
