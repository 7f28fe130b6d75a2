"""Tensor parallelism through the engine (issue 16's done-when): decode speed of a large
hybrid on 1, 2 and 4 GPUs against each GPU's roofline, the scaling of a model that fits
one GPU, and a ShareGPT replay with AVMP against the static split on 2 GPUs.

Three parts (``--part``, each well under ten minutes on H200s):

- ``decode``: Nemotron-H-47B geometry, random bf16 weights built per rank
  (`avmp.engine.tp_step.RandomWeights`), decode at batch 64 and 256 from 1,024-token
  prompts, on each of ``--sizes`` (a size whose weights and cache do not fit one GPU is
  recorded as skipped, with why). Per cell: the median decode step (benchmarks/engine.py's
  profiled `engine_cell`: Triton kernels, decode CUDA graphs capturing the all-reduces),
  tokens/s, and its share of two per-GPU bounds: the HBM roofline (the rank's weights,
  KV and state read once a step at the H200's datasheet bandwidth) and the simulator's
  roofline with its NVLink all-reduce term (`avmp.sim.timing.RooflineModel` on
  `rank_geometry`).
- ``scaling``: the same cells on Nemotron-H-8B, which fits one GPU; speed-up over one
  GPU (the bar: >= 1.7x on 2, >= 3x on 4).
- ``replay``: the committed ShareGPT trace (vLLM's sampling rules), every request at
  t = 0, through the engine on ``--replay-sizes`` GPUs with AVMP and with SGLang's
  static split at one per-GPU budget: req/s, output tok/s, preemptions, TTFT and TPOT.

Every cell's engine budget is each GPU's cache (`EngineConfig.tensor_parallel`).
``--smoke`` runs every part on the CPU (gloo, tiny random Nemotron-H, 1 and 2 ranks,
reference kernels, wall-clock step times; no roofline) in about half a minute.

    python -m benchmarks.tp --part decode --out benchmarks/results/tp_decode.json
    python -m benchmarks.tp --part scaling --out benchmarks/results/tp_scaling.json
    python -m benchmarks.tp --part replay --out benchmarks/results/tp_replay.json
    python -m benchmarks.tp --markdown benchmarks/results/tp_decode.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from avmp.units import format_bytes, parse_bytes, round_up
from benchmarks.common import read_result, write_result

PARTS = ("decode", "scaling", "replay")
BIG_MODEL = "nemotron-h-47b"
SCALING_MODEL = "nemotron-h-8b"
TRACE = Path(__file__).parent / "traces" / "sharegpt_vllm_600.jsonl"
CHUNK = 2 << 20
# room kept per GPU beside weights, cache and the activation estimate (CUDA context,
# NCCL buffers, graphs)
SLACK_BYTES = 6 << 30
SMOKE = dict(sizes=[1, 2], batches=[2, 4], prompt_len=16, decode_tokens=4,
             replay_requests=8, replay_sizes=[2], max_prompt=48, max_output=6)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, nargs="+", default=list(PARTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="GPUs per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--big-model", default=BIG_MODEL)
    parser.add_argument("--scaling-model", default=SCALING_MODEL)
    parser.add_argument("--replay-model", default=BIG_MODEL)
    parser.add_argument("--replay-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--replay-memory", default="16GiB", help="each GPU's cache (16GiB)")
    parser.add_argument("--replay-requests", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny models")
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the tables of a results file")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    else:
        args.max_prompt = args.max_output = None
    if any(not 1 <= n <= 8 for n in [*args.sizes, *args.replay_sizes]):
        parser.error("sizes must be in 1..8")
    return args


# -- models and budgets ----------------------------------------------------------------


def model_config(name: str, smoke: bool) -> Any:
    """The zoo model as a transformers config: full size in bf16, or (smoke) tiny."""
    from avmp.engine.tiny import tiny_config
    from avmp.models.zoo import zoo_config
    from benchmarks.engine import transformers_config

    return tiny_config(zoo_config(name)) if smoke else transformers_config(name)


def full_geometry(config: Any) -> Any:
    """The whole model's cache geometry (bf16 state, vLLM's conv columns), from its
    shapes alone (built on the meta device)."""
    import torch

    from avmp.models.geometry import ConvColumns
    from benchmarks.engine import build_model

    model = build_model(config, torch.device("meta"))
    return model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)


def cache_budget(geometry: Any, size: int, batch: int, tokens: int) -> int:
    """One GPU's cache for ``batch`` requests of ``tokens`` tokens each on ``size``
    GPUs (its shard of every page and slot), in whole chunks with one chunk spare per
    pool."""
    from avmp.models.tensor_parallel import rank_geometry

    rank = rank_geometry(geometry, size)
    pages = batch * (tokens // 16 + 2) * 16 * rank.kv_bytes_per_token
    state = batch * rank.state_bytes_per_request
    return round_up(pages, CHUNK) + round_up(state, CHUNK) + 2 * CHUNK


def fits_one_gpu(geometry: Any, size: int, memory_bytes: int) -> str | None:
    """Why a cell cannot run on H200s (weights + cache + slack above one GPU's memory,
    weights as `avmp plan --tensor-parallel` estimates them); None when it can."""
    from avmp.models.tensor_parallel import rank_geometry
    from avmp.sim.timing import get_profile

    weights = rank_geometry(geometry, size).weight_bytes
    needed = weights + memory_bytes + SLACK_BYTES
    room = get_profile("h200").memory_bytes
    if needed <= room:
        return None
    return (
        f"weights {format_bytes(weights)} + cache {format_bytes(memory_bytes)} + "
        f"{format_bytes(SLACK_BYTES)} > {format_bytes(room)} per GPU"
    )


def engine_config(args: argparse.Namespace, size: int, memory_bytes: int, **fields: Any) -> Any:
    from avmp.engine.engine import EngineConfig

    gpu = not args.smoke
    options: dict[str, Any] = dict(
        memory_bytes=memory_bytes, device="cuda" if gpu else "cpu",
        kernels="triton" if gpu else "reference", backing="cuda_vmm" if gpu else "torch",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192 if gpu else 64,
        tensor_parallel=size,
    )  # fmt: skip
    return EngineConfig(**{**options, **fields})


def release(engine: Any) -> None:
    engine.close()
    gc.collect()
    if engine.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# -- decode cells ------------------------------------------------------------------------


def decode_cells(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    """Decode at every batch of ``--batches`` on every size of ``--sizes``: one engine per
    size, its budget sized for the largest batch."""
    config = model_config(name, args.smoke)
    geometry = full_geometry(config)
    tokens = args.prompt_len + args.decode_tokens
    cells = []
    for size in args.sizes:
        budgets = {b: cache_budget(geometry, size, b, tokens) for b in args.batches}
        why = {b: None if args.smoke else fits_one_gpu(geometry, size, m)
               for b, m in budgets.items()}  # fmt: skip
        for batch in [b for b in args.batches if why[b] is not None]:
            cells.append(dict(model=name, size=size, batch=batch, skipped=why[batch]))
            print(f"{name} on {size} GPU(s), batch {batch}: skipped, {why[batch]}", flush=True)
        batches = [b for b in args.batches if why[b] is None]
        if batches:
            cells += size_cells(args, name, config, geometry, size, batches, budgets)
    return cells


def size_cells(
    args: argparse.Namespace,
    name: str,
    config: Any,
    geometry: Any,
    size: int,
    batches: list[int],
    budgets: dict[int, int],
) -> list[dict[str, Any]]:
    """The cells of one size: one engine, its budget sized for the largest batch."""
    from avmp.engine.engine import Engine
    from avmp.engine.tp_step import RandomWeights

    memory = budgets[max(batches)]
    engine = Engine(RandomWeights(config, args.seed), engine_config(args, size, memory))
    cells = []
    try:
        for batch in batches:
            cell = decode_cell(engine, args, batch)
            cell.update(model=name, size=size, memory_bytes=memory)
            if not args.smoke:
                cell.update(rooflines(engine, geometry, size, batch, cell))
            cells.append(cell)
            print(_decode_line(cell), flush=True)
    finally:
        release(engine)
    return cells


def decode_cell(engine: Any, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """The profiled decode figures of one batch (benchmarks/engine.py's `engine_cell`)
    on a GPU; on the CPU the median wall time of a decode step."""
    from benchmarks.engine import engine_cell, random_prompts

    if not args.smoke:
        cell = engine_cell(engine, batch, args.prompt_len, args.decode_tokens, args.seed)
        cell.pop("steps", None)
        return cell
    vocab = engine.geometry.vocab_size
    prompts = random_prompts(batch, args.prompt_len, vocab, args.seed)
    engine.generate(prompts, 1, ignore_eos=True)  # prefill and warm up
    start = time.perf_counter()
    engine.generate(prompts, args.decode_tokens, ignore_eos=True)
    wall = time.perf_counter() - start
    return {"batch": batch, "generate_wall_s": wall,
            "decode_tokens_per_s": batch * args.decode_tokens / wall}  # fmt: skip


def rooflines(
    engine: Any, geometry: Any, size: int, batch: int, cell: dict[str, Any]
) -> dict[str, Any]:
    """The cell's tokens/s as a share of each GPU's HBM roofline and of the
    simulator's roofline with the all-reduces (one GPU's H200 profile)."""
    from avmp.models.tensor_parallel import rank_geometry
    from avmp.sim.timing import BatchShape, RooflineModel, get_profile
    from benchmarks.engine import decode_roofline

    profile = get_profile("h200")
    context = cell["median_decode_context_tokens"] // batch
    hbm = decode_roofline(engine, batch, batch * context, profile.hbm_bytes_per_s)
    shape = BatchShape(num_decode_requests=batch, num_context_tokens=batch * context,
                       num_requests=batch, longest_context_tokens=context)  # fmt: skip
    model = RooflineModel(rank_geometry(geometry, size), profile)
    step_s = model.step_seconds(shape)
    tokens_per_s = cell["decode_tokens_per_s"]
    return {
        "hbm_roofline_tokens_per_s": hbm["tokens_per_s"],
        "hbm_roofline_share": tokens_per_s / hbm["tokens_per_s"],
        "sim_step_s": step_s,
        "sim_all_reduce_s": model.communication_seconds(shape),
        "sim_share": tokens_per_s / (batch / step_s),
    }


def _decode_line(cell: dict[str, Any]) -> str:
    line = (
        f"{cell['model']} on {cell['size']}: batch {cell['batch']}, "
        f"{cell['decode_tokens_per_s']:.0f} tok/s"
    )
    if "hbm_roofline_share" in cell:
        line += (
            f" ({cell['hbm_roofline_share']:.0%} of the HBM roofline, "
            f"{cell['sim_share']:.0%} of the simulator's)"
        )
    return line


def speedups(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch and size, tokens/s over the one-GPU cell of the same batch."""
    base = {c["batch"]: c for c in cells if c["size"] == 1 and "skipped" not in c}
    rows = []
    for cell in cells:
        one = base.get(cell["batch"])
        if "skipped" in cell or one is None:
            continue
        ratio = cell["decode_tokens_per_s"] / one["decode_tokens_per_s"]
        rows.append(dict(batch=cell["batch"], size=cell["size"], speedup=ratio))
    return rows


# -- the replay --------------------------------------------------------------------------


def load_trace(args: argparse.Namespace) -> list[Any]:
    """The first ``--replay-requests`` requests of the committed ShareGPT trace, all at
    t = 0 (offline: memory decides the batch); clipped to tiny lengths for the smoke."""
    from avmp.bench.traces import read_trace

    trace = read_trace(TRACE)[: args.replay_requests]
    clip = [
        dataclasses.replace(
            r, arrival_s=0.0,
            prompt_tokens=min(r.prompt_tokens, args.max_prompt or r.prompt_tokens),
            output_tokens=min(r.output_tokens, args.max_output or r.output_tokens),
        )
        for r in trace
    ]  # fmt: skip
    return clip


def replay_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The trace on every size of ``--replay-sizes``, AVMP then static, same budget."""
    from avmp.engine.engine import Engine
    from avmp.engine.tp_step import RandomWeights

    name = args.scaling_model if args.smoke else args.replay_model
    config = model_config(name, args.smoke)
    trace = load_trace(args)
    memory = 6 << 20 if args.smoke else parse_bytes(args.replay_memory)
    runs = []
    for size in args.replay_sizes:
        for allocator in ("avmp", "static"):
            engine_options = engine_config(args, size, memory, allocator=allocator)
            engine = Engine(RandomWeights(config, args.seed), engine_options)
            try:
                run = replay_one(engine, trace, args.seed)
            finally:
                release(engine)
            run.update(model=name, size=size, allocator=allocator, memory_bytes=memory)
            runs.append(run)
            print(_replay_line(run), flush=True)
    return runs


def replay_one(engine: Any, trace: list[Any], seed: int) -> dict[str, Any]:
    """One warm-up request, then the whole trace; what it did."""
    engine.warmup()
    rng = np.random.default_rng(seed)
    vocab = engine.geometry.vocab_size
    prompts = [rng.integers(3, vocab, size=r.prompt_tokens).tolist() for r in trace]
    limits = [r.output_tokens for r in trace]
    outputs = engine.generate(prompts, max_tokens=limits, ignore_eos=True)
    stats = engine.stats
    done = [o for o in outputs if o.finish_reason == "length"]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    tpot = [o.tpot_s for o in done if o.tpot_s is not None]
    return {
        "num_requests": len(trace),
        "num_completed": len(done),
        "wall_s": stats.elapsed_s,
        "request_throughput": len(done) / stats.elapsed_s,
        "output_token_throughput": stats.num_generated_tokens / stats.elapsed_s,
        "num_preemptions": stats.num_preemptions,
        "num_migrations": stats.allocator.num_migrations,
        "num_compactions": stats.allocator.num_compactions,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "tpot_p50_s": statistics.median(tpot) if tpot else None,
        "peak_kv_capacity_bytes": stats.peak_kv_capacity_bytes,
        "peak_state_capacity_bytes": stats.peak_state_capacity_bytes,
    }


def _replay_line(run: dict[str, Any]) -> str:
    return (
        f"replay {run['model']} on {run['size']}, {run['allocator']}: "
        f"{run['num_completed']}/{run['num_requests']} in {run['wall_s']:.1f} s, "
        f"{run['request_throughput']:.2f} req/s, {run['output_token_throughput']:.0f} tok/s, "
        f"{run['num_preemptions']} preemptions"
    )


# -- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {
        "conditions": {
            "device": "cpu (gloo)" if args.smoke else torch.cuda.get_device_name(0),
            "num_gpus": 0 if args.smoke else torch.cuda.device_count(),
            "torch": torch.__version__, "smoke": args.smoke, "prompt_len": args.prompt_len,
            "decode_tokens": args.decode_tokens, "seed": args.seed,
            "command": " ".join(["python -m benchmarks.tp", *sys.argv[1:]]),
        },
    }  # fmt: skip
    if "decode" in args.part:
        results["decode"] = decode_cells(args, args.scaling_model if args.smoke else args.big_model)
    if "scaling" in args.part:
        # the smoke's decode part already ran the scaling model
        smoke_cells = results.get("decode") if args.smoke else None
        cells = smoke_cells or decode_cells(args, args.scaling_model)
        results["scaling"] = {"cells": cells, "speedups": speedups(cells)}
    if "replay" in args.part:
        results["replay"] = replay_runs(args)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Conditions: {results['conditions']}", ""]
    header = "| model | GPUs | batch | tok/s | HBM roofline share | simulator share |"
    for key in ("decode", "scaling"):
        cells = results.get(key)
        cells = cells["cells"] if isinstance(cells, dict) else cells
        if not cells:
            continue
        lines += [f"**{key}**", "", header, "|---|---|---|---|---|---|"]
        for c in cells:
            if "skipped" in c:
                lines.append(f"| {c['model']} | {c['size']} | {c['batch']} | skipped: "
                             f"{c['skipped']} | | |")  # fmt: skip
                continue
            hbm, sim = c.get("hbm_roofline_share"), c.get("sim_share")
            lines.append(
                f"| {c['model']} | {c['size']} | {c['batch']} | {c['decode_tokens_per_s']:,.0f} "
                f"| {'' if hbm is None else f'{hbm:.0%}'} | {'' if sim is None else f'{sim:.0%}'} |"
            )
        lines.append("")
    for row in results.get("scaling", {}).get("speedups", []):
        lines.append(f"- batch {row['batch']}: {row['speedup']:.2f}x on {row['size']} GPU(s)")
    if results.get("replay"):
        lines += ["", "| model | GPUs | layout | completed | req/s | tok/s | preemptions |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["replay"]:
            lines.append(
                f"| {r['model']} | {r['size']} | {r['allocator']} | {r['num_completed']} of "
                f"{r['num_requests']} | {r['request_throughput']:.2f} | "
                f"{r['output_token_throughput']:,.0f} | {r['num_preemptions']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    results = run(args)
    if args.out is not None:
        print(f"saved {write_result(args.out, results)}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
