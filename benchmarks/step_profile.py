"""Where one engine step's time goes on a GPU: a decode batch replayed as a CUDA graph or
run eagerly, a prefill chunk, and the two mixed in one step (eagerly, and replayed as a
CUDA graph padded to its token and sequence buckets), with the kernels' GPU time from
``torch.profiler``. Beside that small case, a large one: the same decodes with a full
step's chunk of a long prompt (``--large-step`` tokens in all, after ``--large-context``
cached tokens of its own prompt), as a CUDA graph and eagerly, beside the chunk alone and
the decode batch alone (graphs); its kernel table puts the eager mixed step's kernels
beside the eager chunk alone's, so the time the decodes add is attributed to kernels.

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
DIFFERENCE_ROWS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="cached tokens per decode")
    parser.add_argument("--prefill", type=int, default=300, help="tokens of the prefill chunk")
    parser.add_argument(
        "--large-step",
        type=int,
        default=8192,
        help="tokens of the large mixed step (decodes + chunk; 0: no large step)",
    )
    parser.add_argument(
        "--large-context",
        type=int,
        default=8192,
        help="cached tokens of the large chunk's own prompt before it",
    )
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the docs tables of a results file")
    args = parser.parse_args(argv)
    if args.large_step and args.large_step <= args.decode_batch:
        parser.error(
            f"--large-step {args.large_step} leaves no prefill chunk beside "
            f"{args.decode_batch} decodes (0: no large step)"
        )
    if args.large_context < 0:
        parser.error(f"--large-context must be >= 0, got {args.large_context}")
    return args


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


def kernel_events(runner: Any, work: list[Any]) -> list[Any]:
    """The profiler's kernel rows over three eager runs of ``work``, longest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(work)
        torch.cuda.synchronize()
    # kernels only: an operator's row repeats the GPU time of the kernels it launched
    events = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
    events.sort(key=lambda e: -e.device_time_total)
    return events


def kernel_table(runner: Any, work: list[Any]) -> dict[str, Any]:
    """GPU time per kernel and the host time of one eager run (three runs averaged)."""
    events = kernel_events(runner, work)
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


def kernel_times(runner: Any, work: list[Any]) -> dict[str, list[float]]:
    """Every kernel's GPU ms and calls per eager run of ``work`` (three runs averaged)."""
    return {
        e.key: [e.self_device_time_total / 3 / 1e3, e.count / 3]
        for e in kernel_events(runner, work)
        if e.self_device_time_total > 0
    }


def kernel_difference(
    mixed: dict[str, list[float]], alone: dict[str, list[float]], rows: int = DIFFERENCE_ROWS
) -> dict[str, Any]:
    """The kernels of a mixed step beside those of its prefill chunk alone (`kernel_times`
    of each): per kernel ms in both and the difference, the ``rows`` largest differences
    (what the decodes add, or a kernel that got slower) first, then the totals."""
    none = [0.0, 0.0]
    table: list[dict[str, Any]] = []
    for name in set(mixed) | set(alone):
        (mixed_ms, mixed_calls), (alone_ms, alone_calls) = (
            mixed.get(name, none),
            alone.get(name, none),
        )
        table.append({"kernel": name[:80], "mixed_ms": mixed_ms, "alone_ms": alone_ms,
                      "difference_ms": mixed_ms - alone_ms, "mixed_calls": mixed_calls,
                      "alone_calls": alone_calls})  # fmt: skip
    table.sort(key=lambda r: (-abs(r["difference_ms"]), r["kernel"]))
    mixed_ms = sum(v[0] for v in mixed.values())
    alone_ms = sum(v[0] for v in alone.values())
    return {
        "mixed_gpu_ms": mixed_ms,
        "alone_gpu_ms": alone_ms,
        "difference_ms": mixed_ms - alone_ms,
        "num_kernels": len(table),
        "kernels": table[:rows],
    }


def profile_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch

    from avmp.engine.engine import Engine, EngineConfig
    from avmp.engine.fast_runner import FastModelRunner
    from avmp.engine.runner import SequenceWork
    from benchmarks.engine import build_model, transformers_config

    model = build_model(transformers_config(name), torch.device("cuda"))
    config = EngineConfig(8 << 30, device="cuda", kernels="triton", max_num_seqs=256,
                          max_num_batched_tokens=max(8192, args.large_step))  # fmt: skip
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
    if args.large_step > 0:
        chunk = large_chunk_tokens(args.large_step, args.decode_batch)
        large = [placed(20_000, chunk, args.large_context)]
        result["large"] = large_case(graphs, eager, decode, large, args.large_context)
        result["large"]["decode_graph_ms"] = timings["decode_graph_ms"]
        result["large"].update(large_ratios(result["large"]))
    engine.backing.close()
    return result


def large_chunk_tokens(step: int, decodes: int) -> int:
    """The chunk of a step of ``step`` tokens beside ``decodes`` decodes (one token each)."""
    if step <= decodes:
        raise ValueError(
            f"a step of {step} tokens leaves no prefill chunk beside {decodes} decodes"
        )
    return step - decodes


def large_case(
    graphs: Any, eager: Any, decode: list[Any], chunk: list[Any], context: int
) -> dict[str, Any]:
    """The decodes with a full step's chunk, as a graph and eagerly, the chunk alone, and
    the kernels of the two eager steps side by side."""
    mixed = decode + chunk
    timings = {
        "mixed_eager_ms": median_ms(eager, mixed),
        "chunk_eager_ms": median_ms(eager, chunk),
        "mixed_graph_ms": median_ms(graphs, mixed),
        "chunk_graph_ms": median_ms(graphs, chunk),
    }
    # after the runs above, which captured what they could
    mixed_shape = graphs.padded_shape(mixed, is_decode=False)
    chunk_shape = graphs.padded_shape(chunk, is_decode=False)
    return {
        "chunk_tokens": len(chunk[0].token_ids),
        "context": context,
        **timings,
        "mixed_graph": mixed_shape is not None and mixed_shape in graphs.mixed_graphs,
        "chunk_graph": chunk_shape is not None and chunk_shape in graphs.mixed_graphs,
        "mixed_bucket": None if mixed_shape is None else list(mixed_shape[:2]),
        "chunk_bucket": None if chunk_shape is None else list(chunk_shape[:2]),
        "kernels": kernel_difference(kernel_times(eager, mixed), kernel_times(eager, chunk)),
    }


def large_ratios(large: dict[str, Any]) -> dict[str, float]:
    """The large mixed step against its parts: graphs (decode graph + chunk graph) and
    eager (eager mixed against decode graph + eager chunk)."""
    parts_graph = large["decode_graph_ms"] + large["chunk_graph_ms"]
    parts_eager = large["decode_graph_ms"] + large["chunk_eager_ms"]
    return {
        "parts_graph_ms": parts_graph,
        "ratio_graph": large["mixed_graph_ms"] / parts_graph,
        "parts_eager_ms": parts_eager,
        "ratio_eager": large["mixed_eager_ms"] / parts_eager,
    }


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
        if "large" in m:  # results from before the large case lack it
            lines += large_markdown(m)
    return "\n".join(lines)


def large_markdown(m: dict[str, Any]) -> list[str]:
    """The large mixed step's times and its kernels beside the chunk alone's."""
    large = m["large"]

    def how(graph: bool, bucket: list[int] | None) -> str:
        if not graph:
            return "eager (no graph)"
        return (
            f"CUDA graph, padded to {bucket[0]} tokens, {bucket[1]} rows"
            if bucket
            else "CUDA graph"
        )

    k = large["kernels"]
    lines = [
        f"Large mixed step: {m['decode_batch']} decodes of {m['context']} cached tokens and a "
        f"chunk of {large['chunk_tokens']:,} tokens after {large['context']:,} cached tokens "
        "of its own prompt.",
        "",
        "| case | ms |",
        "| --- | ---: |",
        f"| decode batch, CUDA graph | {large['decode_graph_ms']:.2f} |",
        f"| chunk alone, {how(large['chunk_graph'], large['chunk_bucket'])} "
        f"| {large['chunk_graph_ms']:.2f} |",
        f"| chunk alone, eager | {large['chunk_eager_ms']:.2f} |",
        f"| decodes + chunk in one step, {how(large['mixed_graph'], large['mixed_bucket'])} "
        f"| {large['mixed_graph_ms']:.2f} |",
        f"| decodes + chunk in one step, eager | {large['mixed_eager_ms']:.2f} |",
        f"| mixed graph / (decode graph + chunk graph) | {large['ratio_graph']:.2f}x |",
        f"| mixed eager / (decode graph + chunk eager) | {large['ratio_eager']:.2f}x |",
        "",
        f"GPU time of the eager large mixed step {k['mixed_gpu_ms']:.2f} ms, of the eager "
        f"chunk alone {k['alone_gpu_ms']:.2f} ms ({k['difference_ms']:+.2f} ms over "
        f"{k['num_kernels']} kernels); the largest differences:",
        "",
        "| kernel | ms in mixed | ms alone | difference | calls mixed / alone |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{r['kernel']}` | {r['mixed_ms']:.3f} | {r['alone_ms']:.3f} | "
        f"{r['difference_ms']:+.3f} | {r['mixed_calls']:g} / {r['alone_calls']:g} |"
        for r in k["kernels"]
    ]
    return [*lines, ""]


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
