"""Time each Triton kernel against the torch reference path on a CUDA GPU.

Shapes are Nemotron-H-8B's (attention: 32 query heads, 8 KV heads, head_dim 128;
Mamba2: 128 heads x 64, d_state 128, 8 groups, conv 10240 channels x d_conv 4), bf16
activations and KV, fp32 SSM state, over page-/slot-major pools laid out as AVMP lays
them out (a page holds all 4 attention layers' K and V; a slot holds several layers'
states), so every view is strided. Each kernel is also checked against its baseline
(relative error printed beside the time).

The Mamba2 prefill scans also get a throughput section of their own on both hybrid
geometries (Granite-4.0-H-Micro and Nemotron-H-8B): the chunked (SSD) scan beside the
sequential varlen scan on the same step, as tokens/s, achieved FLOP/s against the H200's
bf16 dense peak and bytes/s against its HBM bandwidth.

Mamba1 (Jamba-1.5-Mini's mixer: d_inner 8192, d_state 16; dt_rank 256 lives in the dt
projection, before the kernels) has a section of its own: the decode update and the
varlen prefill scan (in its default token blocks, and one token after another) against
the reference path (softplus, slot gather, sequential torch scan or step, scatter,
gate), with tokens/s for prefill.

Baselines: the engine's torch reference kernels (``avmp.kernels.reference``) called the
way a torch engine step would call them (per request for attention and conv, batched
for the Mamba2 step with a gather/scatter of the slots), and, for decode attention, a
batched torch gather + SDPA. Times are medians of ``triton.testing.do_bench``; bytes
are the fewest the kernel must move, so GB/s compares with the HBM copy bandwidth
measured in the same run.

    PYTHONPATH=src python3 -m benchmarks.kernels --out $OUT/kernels.json.gz

The measuring lives in `benchmarks.kernels_measure`, imported only to measure: it needs
Triton, which drawing a saved result's tables (``--markdown FILE``) does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import read_result, write_result

# The scan section's ceilings: the H200's dense bf16 tensor cores and HBM3e.
PEAK_BF16_TFLOPS = 989.0
HBM_TBPS = 4.8


def mamba1_table(rows: list[dict[str, object]]) -> list[str]:
    """The Mamba1 section: each kernel beside the reference path, prefill in tokens/s."""
    lines = ["| Mamba1 kernel | shape | Triton ms | GB/s | tokens/s | baseline | baseline ms "
             "| speed-up | rel err |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        batch, tokens = (int(p.split("=")[1]) for p in str(r["shape"]).split()[:2])
        ms = float(r["triton_ms"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {ms:.4f} | {r['triton_gbps']:.0f} | "
            f"{batch * tokens / ms * 1e3:,.0f} | {r['baseline']} | {r['baseline_ms']:.3f} | "
            f"{float(r['baseline_ms']) / ms:.1f}x | {r['rel_error']:.1e} |"  # type: ignore[arg-type]
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results file to write (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path,
                        help="print the docs table of a saved file (one run's, as --out "
                        "writes it, or {'runs': [result, ...]})")
    args = parser.parse_args()
    if args.markdown:
        saved = read_result(args.markdown)
        print(markdown_table(saved.get("runs", [saved])))
        return
    if args.out is None:
        parser.error("--out is required to run the benchmark")
    from benchmarks import kernels_measure  # imports Triton: only measuring needs it

    result = kernels_measure.measure()
    write_result(args.out, result)
    print_table(result)


def print_table(result: dict[str, object]) -> None:
    print(f"device: {result['device']}  torch {result['torch']}  dtype {result['dtype']}  "
          f"copy bandwidth {result['copy_gbps']:.0f} GB/s")
    print("| kernel | shape | Triton ms | GB/s | eager µs/call | baseline | baseline ms | "
          "speed-up | rel err |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in result["rows"]:  # type: ignore[attr-defined]
        print(f"| {r['kernel']} | {r['shape']} | {r['triton_ms']:.4f} | {r['triton_gbps']:.0f} | "
              f"{r['wall_us']:.0f} | "
              f"{r['baseline']} | {r['baseline_ms']:.3f} | "
              f"{r['baseline_ms'] / r['triton_ms']:.1f}x | {r['rel_error']:.1e} |")
    print("\n| decode variant | BLOCK_N | splits | ms | GB/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for v in result["decode_variants"]:  # type: ignore[attr-defined]
        print(f"| {v['shape']} | {v['block_n']} | {v['num_splits']} | {v['ms']:.4f} | "
              f"{v['gbps']:.0f} |")
    print()
    print("\n".join(scan_table(result.get("scan_throughput", []))))  # type: ignore[arg-type]
    if result.get("mamba1"):
        print()
        print("\n".join(mamba1_table(result["mamba1"])))  # type: ignore[arg-type]


def scan_table(scans: list[dict[str, object]]) -> list[str]:
    """The scan section: the chunked scan's throughput against the ceilings, and the
    sequential varlen scan on the same step."""
    lines = [
        f"| Mamba2 scan | step | chunked ms | varlen ms | tokens/s | TFLOP/s (of "
        f"{PEAK_BF16_TFLOPS:.0f}) | GB/s (of {HBM_TBPS * 1e3:.0f}) | speed-up | rel err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scans:
        lines.append(
            f"| {s['geometry']} | {s['shape']} | {s['chunked_ms']:.3f} | {s['varlen_ms']:.3f} | "
            f"{s['tokens_per_s']:,.0f} | {s['tflops']:.1f} ({s['peak_share']:.1%}) | "
            f"{s['gbps']:.0f} ({s['hbm_share']:.1%}) | "
            f"{s['varlen_ms'] / s['chunked_ms']:.1f}x | {s['rel_error']:.1e} |"  # type: ignore[operator]
        )
    return lines


def markdown_table(runs: list[dict[str, object]]) -> str:
    """The docs table: each kernel row with its Triton time in every run (spread), the
    first run's bandwidth, eager wall time and baseline."""
    first = runs[0]
    lines = [
        f"Device: {first['device']}, torch {first['torch']}, {first['dtype']} activations and "
        f"KV, fp32 SSM state; HBM copy {first['copy_gbps']:.0f} GB/s (read + write) in the "
        "same run.",
        "",
        "| kernel | shape | Triton ms (runs) | GB/s | eager µs/call | baseline | baseline ms "
        "| speed-up | rel err |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(first["rows"]):  # type: ignore[attr-defined]
        times = " / ".join(f"{run['rows'][i]['triton_ms']:.3f}" for run in runs)  # type: ignore[index]
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {times} | {r['triton_gbps']:.0f} | "
            f"{r['wall_us']:.0f} | {r['baseline']} | {r['baseline_ms']:.3f} | "
            f"{r['baseline_ms'] / r['triton_ms']:.1f}x | {r['rel_error']:.1e} |"
        )
    if first.get("scan_throughput"):  # runs saved before the scan section have none
        lines += ["", *scan_table(first["scan_throughput"])]  # type: ignore[arg-type]
    if first.get("mamba1"):  # runs saved before the Mamba1 section have none
        lines += ["", *mamba1_table(first["mamba1"])]  # type: ignore[arg-type]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
