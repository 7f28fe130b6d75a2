"""Where one engine step's time goes on a GPU: a decode batch replayed as a CUDA graph or
run eagerly, a prefill chunk, and the two mixed in one step (eagerly, and replayed as a
CUDA graph padded to its token and sequence buckets), with the kernels' GPU time from
``torch.profiler``.

The requests are placed with the engine's own allocator (their caches hold whatever bytes
were there: the timing does not depend on them); each case is run three times to warm up
and timed as the median of ten synchronised runs of the runner alone (no scheduler, no
sampling). The kernel tables sum each kernel's GPU time over three eager runs of the case.

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.step_profile --out $OUT/step_profile_h100.json.gz
    python3 -m benchmarks.step_profile --markdown benchmarks/results/step_profile_h100.json.gz
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import read_result, write_result

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
TABLE_ROWS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="cached tokens per decode")
    parser.add_argument("--prefill", type=int, default=300, help="tokens of the prefill chunk")
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the docs tables of a results file")
    return parser.parse_args(argv)


def median_ms(runner: Any, work: list[Any]) -> float:
    import torch

    for _ in range(3):
        runner.execute(work)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        runner.execute(work)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_table(runner: Any, work: list[Any]) -> dict[str, Any]:
    """GPU time per kernel and the host time of one eager run (three runs averaged)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(work)
        torch.cuda.synchronize()
    # kernels only: an operator's row repeats the GPU time of the kernels it launched
    events = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
    events.sort(key=lambda e: -e.device_time_total)
    gpu_ms = sum(e.self_device_time_total for e in events) / 3 / 1e3
    rows = [
        {
            "kernel": e.key[:80],
            "ms_per_step": e.self_device_time_total / 3 / 1e3,
            "calls_per_step": e.count // 3,
        }
        for e in events
        if e.self_device_time_total > 0
    ][:TABLE_ROWS]
    launches = sum(e.count for e in events if e.self_device_time_total > 0) // 3
    return {"gpu_ms": gpu_ms, "launches": launches, "kernels": rows}


def profile_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch

    from avmp.engine.engine import Engine, EngineConfig
    from avmp.engine.fast_runner import FastModelRunner
    from avmp.engine.runner import SequenceWork
    from benchmarks.engine import build_model, transformers_config

    model = build_model(transformers_config(name), torch.device("cuda"))
    config = EngineConfig(8 << 30, device="cuda", kernels="triton", max_num_seqs=256,
                          max_num_batched_tokens=8192)  # fmt: skip
    engine = Engine(model, config)
    engine.warmup()

    def placed(request_id: int, new_tokens: int, context: int) -> SequenceWork:
        blocks = engine.allocator.admit(request_id, context + new_tokens)
        assert blocks is not None, "the 8 GiB cache is too small for the profiled requests"
        rows = engine.views.page_rows(blocks.pages)
        return SequenceWork([5] * new_tokens, context, engine.views.slot_row(blocks.slot),
                            rows, True)  # fmt: skip

    decode = [placed(i, 1, args.context) for i in range(args.decode_batch)]
    prefill = [placed(10_000, args.prefill, 0)]
    graphs = engine.runner
    eager = FastModelRunner(engine.model, engine.views, engine.config.block_size,
                            engine.device, cuda_graphs=False)  # fmt: skip
    assert isinstance(graphs, FastModelRunner)
    mixed = decode + prefill
    timings = {
        "decode_graph_ms": median_ms(graphs, decode),
        "decode_eager_ms": median_ms(eager, decode),
        "prefill_eager_ms": median_ms(eager, prefill),
        "mixed_eager_ms": median_ms(eager, mixed),
        # graphs that cannot be captured (the model, or a failed capture) run eagerly
        "prefill_graph_ms": median_ms(graphs, prefill),
        "mixed_graph_ms": median_ms(graphs, mixed),
    }
    timings["split_ms"] = timings["decode_graph_ms"] + timings["prefill_eager_ms"]
    timings["split_graph_ms"] = timings["decode_graph_ms"] + timings["prefill_graph_ms"]
    shape = graphs.padded_shape(mixed, is_decode=False)
    prefill_shape = graphs.padded_shape(prefill, is_decode=False)
    result = {
        "model": name,
        "decode_batch": args.decode_batch,
        "context": args.context,
        "prefill": args.prefill,
        "mixed_graph": shape is not None and shape in graphs.mixed_graphs,
        "prefill_graph": prefill_shape is not None and prefill_shape in graphs.mixed_graphs,
        "mixed_bucket": None if shape is None else list(shape),
        "mixed_graph_error": graphs.mixed_graph_error,
        **timings,
        "decode": kernel_table(eager, decode),
        "mixed": kernel_table(eager, decode + prefill),
    }
    engine.backing.close()
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']}, torch {results['torch']}.", ""]
    for m in results["models"]:
        lines += [
            f"**{m['model']}**: {m['decode_batch']} decodes of {m['context']} cached tokens; "
            f"a prefill chunk of {m['prefill']} tokens.",
            "",
            "| case | ms |",
            "| --- | ---: |",
            f"| decode batch, CUDA graph | {m['decode_graph_ms']:.2f} |",
            f"| decode batch, eager | {m['decode_eager_ms']:.2f} |",
            f"| prefill chunk alone, eager | {m['prefill_eager_ms']:.2f} |",
            f"| decode batch + prefill chunk in one step, eager | {m['mixed_eager_ms']:.2f} |",
            f"| the two apart (graph + eager) | {m['split_ms']:.2f} |",
        ]
        if "mixed_graph_ms" in m:  # results from before mixed graphs lack these rows
            how = "CUDA graph" if m["mixed_graph"] else "eager (no graph)"
            alone = "CUDA graph" if m["prefill_graph"] else "eager (no graph)"
            bucket = m["mixed_bucket"]
            padded = f", padded to {bucket[0]} tokens, {bucket[1]} rows" if bucket else ""
            lines += [
                f"| prefill chunk alone, {alone} | {m['prefill_graph_ms']:.2f} |",
                f"| decode batch + prefill chunk in one step, {how}{padded} "
                f"| {m['mixed_graph_ms']:.2f} |",
                f"| the two apart (decode graph + prefill {alone}) | {m['split_graph_ms']:.2f} |",
            ]
        lines.append("")
        for case in ("decode", "mixed"):
            table = m[case]
            launches = f" in {table['launches']} launches" if "launches" in table else ""
            lines += [
                f"GPU time of one eager {case} step: {table['gpu_ms']:.2f} ms{launches}; "
                "largest kernels:",
                "",
                "| kernel | ms per step | calls per step |",
                "| --- | ---: | ---: |",
            ]
            lines += [
                f"| `{row['kernel']}` | {row['ms_per_step']:.3f} | {row['calls_per_step']} |"
                for row in table["kernels"]
            ]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    import torch

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "models": [profile_model(args, name) for name in args.models],
    }
    if args.out is not None:
        write_result(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
