"""Tune the prefill attention kernel's launch tiles (`AttentionTiles`) on a CUDA GPU.

Geometries: Granite-4.0-H-Micro and Nemotron-H-8B, read from their zoo configs (query
heads, KV heads, head_dim); bf16 queries and a page-major pool of 16-token pages in
shuffled order, launched as the engine launches it (through the device tile table).
Three steps: (i) one prompt of 8,192 new tokens, nothing cached; (ii) 8,192 new tokens
after 24,576 cached (a chunk of a 32k prompt); (iii) eight prompts of 1,024.

Per geometry the sweep runs in two phases: (1) block_m {64, 128} x block_n {32, 64, 128}
x warps {4, 8} at 2 stages (the defaults first); (2) stages {1, 2, 3, 4} x warps {4, 8}
around phase 1's fastest. A candidate whose staged K and V tiles cannot fit in the GPU's
shared memory is pruned before it compiles; one that fails to compile or launch is
recorded and skipped; one whose output differs from the default tiles' by more than
`MATCH_TOLERANCE` (relative) is rejected. A candidate's score is its time relative to
the defaults', averaged over the steps (each step weighs the same); the lowest wins.
Times: CUDA events around each call, the median after warm-up. After ``--budget-s``
seconds of sweeping (shared evenly by the geometries, what one leaves passing to the
next) the candidates left are skipped and counted.

FLOPs are the causal ones: ``4 * heads * head_dim * pairs`` with the (query, key) pairs
counted exactly (``new * cached + new * (new + 1) / 2`` per prompt), shown as a share of
the 989 TFLOP/s bf16 dense peak of an H100 / H200 SXM.

    PYTHONPATH=src python3 -m benchmarks.attn_tune --budget-s 120 \\
        --out $OUT/attn_tune_h200.json.gz --write-table $OUT/prefill_attention.json
    python3 -m benchmarks.attn_tune --markdown $OUT/attn_tune_h200.json.gz
    TRITON_INTERPRET=1 python3 -m benchmarks.attn_tune --smoke --out /tmp/attn_smoke.json.gz

``--write-table PATH`` writes the package's tuned table (src/avmp/kernels/triton/tuned/
prefill_attention.json) with this GPU's entries for the swept shapes replaced by this
run's: copy it over the packaged file to ship it. ``--smoke`` runs the same sweep on the
CPU under Triton's interpreter with tiny shapes and wall-clock times (a check of the
code path, not a measurement).

The sweep lives in `benchmarks.attn_tune_measure`, imported only to sweep: it needs Triton,
which drawing a saved result's table (``--markdown FILE``) does not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import tuning

MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")


# -- report --------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """The table of a saved result: per geometry and step, defaults against tuned tiles."""
    peak = result["peak_tflops"]
    lines = [f"{result['device']}, torch {result['torch']}, Triton {result['triton']}; "
             f"{result['elapsed_s']:.0f} s; times: {result['timing']}; share of "
             f"{peak:.0f} TFLOP/s (causal FLOPs).", "",
             "| model geometry | step | default tiles | ms | TFLOP/s | share | tuned tiles | "
             "ms | TFLOP/s | share | speed-up | rel err vs default | candidates ok / tried "
             "(skipped) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for g in result["geometries"]:
        geo = g["geometry"]
        name = f"{g['model']} ({geo['heads']}/{geo['kv_heads']} heads, D={geo['head_dim']})"
        ok = sum(t["error"] is None for t in g["trials"])
        for s in g["steps"]:
            lines.append(
                f"| {name} | {s['step']} | {g['default_label']} | {s['default_ms']:.3f} | "
                f"{s['default_tflops']:.0f} | {s['default_peak_share']:.1%} | "
                f"{g['tuned_label']} | {s['tuned_ms']:.3f} | {s['tuned_tflops']:.0f} | "
                f"{s['tuned_peak_share']:.1%} | {s['speedup']:.2f}x | {s['rel_error']:.1e} | "
                f"{ok} / {len(g['trials'])} ({g['skipped']}) |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = tuning.tuner_parser(
        (__doc__ or "").splitlines()[0], models=MODELS, budget_s=120.0,
        markdown_help="print the table of a saved result",
        smoke_help="tiny shapes on the CPU under TRITON_INTERPRET=1 (a code-path check)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def sweep_steps() -> tuning.SweepSteps:
        from benchmarks import attn_tune_measure  # imports Triton: only a sweep needs it

        return attn_tune_measure.sweep_steps(args, argv)

    return tuning.tuner_main("attn_tune", args, tuning.TunerSteps(markdown, markdown, sweep_steps))


if __name__ == "__main__":
    raise SystemExit(main())
