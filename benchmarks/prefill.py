"""Prefill at compute speed: issue 13's measures on one GPU.

For each model geometry (random bf16 weights, built on the GPU as `benchmarks.engine`
builds them) the engine, with its Triton kernels, runs:

- **prefill cells**: ``batch`` prompts of ``prompt`` random tokens under a step budget of
  ``step`` tokens, one token generated each, timed from the call to the last first token
  (after a warm-up run of the same shapes, so no Triton compilation is timed). The FLOPs
  counted are the ones the model must do, whatever the kernels do: every linear layer of
  the body (2 x in x out per token; the LM head only for the one row per prompt that
  samples), causal attention over each token's context (4 x heads x head dim per
  (query, key) pair), and the recurrent layers in their recurrent form (per token and
  Mamba2 layer 5 x heads x head dim x state: decay, outer product and add for the update,
  multiply-add for the readout; plus the causal conv, 2 x channels x width). Divided by
  the time, then by the GPU's dense bf16 peak (the simulator's profile of that GPU, a
  datasheet figure): the share of peak.
- **mixed steps, step for step**: ``--mixed-decodes`` short requests (512-token
  prompts) are prefilled and decoding; then one long prompt arrives, and its chunks share
  steps with their decodes. The scheduler serves the running decodes first, so each mixed
  step gives the prompt ``step - decodes`` tokens until its tail. The same prompt then
  runs alone on an engine whose step budget is that chunk, so its steps compute the same
  chunks at the same contexts (both runs' chunk lists are recorded and any chunk without
  its twin is listed as a mismatch). Per mixed step: its time against the median
  decode-only step of the same batch plus the alone step of the same chunk, the issue's
  "a mixed step costs at most 1.2x its decode part plus its prefill part run alone";
  every step, the largest ratio and the ratio weighted by the steps' prompt tokens.
- **a long prompt** (``--long-tokens``, 128k by default) in chunks of ``--long-step``
  tokens on a cache budget just big enough for it: its time to first token (after a
  prompt as long has compiled and captured what it needs; that first one's beside), and the peak
  device memory the process allocated beside the weights and the cache budget (what the
  activations took: bounded by the step, not by the prompt, if chunked prefill works).

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.prefill --out $OUT/prefill_h200.json.gz
    python3 -m benchmarks.prefill --markdown benchmarks/results/prefill_h200.json.gz
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from avmp.engine.engine import Engine, EngineConfig, RequestOptions
from avmp.engine.fast_runner import FastModelRunner
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import Mamba2Mixer, PagedAttention
from avmp.engine.profile import StepRecord
from avmp.sim.timing import get_profile
from avmp.units import format_bytes
from benchmarks.common import gpu_profile, measure_or_redraw
from benchmarks.engine import build_model, random_prompts, transformers_config

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
# (prompts, tokens each, step budget): the table
PREFILL_CELLS = ((1, 16384, 8192), (1, 32768, 8192), (8, 4096, 8192), (8, 4096, 16384))
LONG_TOKENS = 131072
MIXED_DECODES = 64
MIXED_PROMPT_TOKENS = 16384
MIXED_STEP_TOKENS = 8192
MIXED_SHORT_TOKENS = 512  # prompt of each decoding request
MIXED_DECODE_LIMIT = 64  # tokens each decoding request generates
CACHE_HEADROOM = 1.25  # cache budget over what the cell's requests need at their peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", metavar="FILE", help="print the tables of a results file")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--long-tokens", type=int, default=LONG_TOKENS)
    parser.add_argument("--long-step", type=int, default=8192)
    parser.add_argument("--mixed-decodes", type=int, default=MIXED_DECODES)
    parser.add_argument("--skip-long", action="store_true", help="no long-prompt cell")
    parser.add_argument("--skip-mixed", action="store_true", help="no mixed-step cell")
    return parser.parse_args(argv)


# -- FLOPs the model must do ---------------------------------------------------------------


def linear_flops_per_token(model: HybridModel) -> int:
    """2 x in x out over the body's linear layers (the LM head is counted per sample)."""
    head = getattr(model, "lm_head", None)
    return sum(
        2 * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not head
    )


def head_flops_per_sample(model: HybridModel) -> int:
    head = getattr(model, "lm_head", None)
    return 0 if head is None else 2 * head.in_features * head.out_features


def attention_flops_per_pair(model: HybridModel) -> int:
    """QK^T and PV for one (query, key) pair, summed over the attention layers."""
    return sum(
        4 * m.num_heads * m.head_dim for m in model.modules() if isinstance(m, PagedAttention)
    )


def recurrent_flops_per_token(model: HybridModel) -> int:
    """The recurrent form's work per token: Mamba2 state update and readout, and the conv."""
    return sum(
        5 * m.intermediate_size * m.d_state + 2 * m.conv_dim * m.d_conv
        for m in model.modules()
        if isinstance(m, Mamba2Mixer)
    )


def causal_pairs(prompt_tokens: int) -> int:
    """(query, key) pairs of a causal prompt: each token attends to itself and before."""
    return prompt_tokens * (prompt_tokens + 1) // 2


def prefill_flops(model: HybridModel, num_prompts: int, prompt_tokens: int) -> dict[str, int]:
    tokens = num_prompts * prompt_tokens
    return {
        "linear": linear_flops_per_token(model) * tokens
        + head_flops_per_sample(model) * num_prompts,
        "attention": attention_flops_per_pair(model) * num_prompts * causal_pairs(prompt_tokens),
        "recurrent": recurrent_flops_per_token(model) * tokens,
    }


# -- cells ---------------------------------------------------------------------------------


def cache_budget(engine_or_geometry: Any, num_prompts: int, tokens: int) -> int:
    geometry = getattr(engine_or_geometry, "geometry", engine_or_geometry)
    need = num_prompts * geometry.request_bytes(tokens + 16)
    return int(need * CACHE_HEADROOM) + (64 << 20)


def engine_for(model: HybridModel, memory_bytes: int, step: int, max_seqs: int) -> Engine:
    config = EngineConfig(
        memory_bytes, device="cuda", kernels="triton", max_num_seqs=max_seqs,
        max_num_batched_tokens=step,
    )  # fmt: skip
    return Engine(model, config)


def timed_generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def prefill_cell(
    model: HybridModel, geometry: Any, cell: tuple[int, int, int], peak_flops: float
) -> dict[str, Any]:
    num_prompts, prompt_tokens, step = cell
    budget = cache_budget(geometry, num_prompts, prompt_tokens)
    engine = engine_for(model, budget, step, num_prompts)
    vocab = geometry.vocab_size
    engine.generate(random_prompts(num_prompts, prompt_tokens, vocab, 1), 1, ignore_eos=True)
    seconds = timed_generate(engine, random_prompts(num_prompts, prompt_tokens, vocab, 2), 1)
    engine.backing.close()
    flops = prefill_flops(model, num_prompts, prompt_tokens)
    total = sum(flops.values())
    return {
        "num_prompts": num_prompts,
        "prompt_tokens": prompt_tokens,
        "step_tokens": step,
        "seconds": seconds,
        "tokens_per_s": num_prompts * prompt_tokens / seconds,
        "flops": flops,
        "flops_per_s": total / seconds,
        "share_of_peak": total / seconds / peak_flops,
    }


def alone_step_tokens(step_tokens: int, decodes: int) -> int:
    """The chunk of a long prompt in a step shared with ``decodes`` running decodes: the
    scheduler serves running requests first (one token each) and the prompt gets what
    is left of the step's budget."""
    chunk = step_tokens - decodes
    if chunk < 1:
        raise ValueError(
            f"a step of {step_tokens} tokens leaves no room for a prompt beside {decodes} decodes"
        )
    return chunk


def prompt_chunks(steps: Sequence[StepRecord]) -> list[dict[str, Any]]:
    """The steps that computed prompt tokens, in order, each with the context the prompt
    had before it. Every prompt token in ``steps`` must be the one long prompt's (the
    runs here record from its arrival, when nothing else is prefilling), so the context
    is the prompt tokens of the steps before."""
    chunks, context = [], 0
    for step in steps:
        if step.num_prefill_tokens == 0:
            continue
        chunks.append({
            "prefill_tokens": step.num_prefill_tokens,
            "context_tokens": context,
            "decodes": step.num_decode_requests,
            "seconds": step.seconds,
            "graph": step.graph,
            "captured": step.captured,
        })  # fmt: skip
        context += step.num_prefill_tokens
    return chunks


def compare_steps(
    mixed: list[dict[str, Any]], alone: list[dict[str, Any]], decode_s: float, decodes: int
) -> dict[str, Any]:
    """Each mixed step against its parts: ``decode_s`` (the decode batch alone) plus the
    alone step that computed the same chunk at the same context. A mixed step without
    such a twin, with another number of decodes, or whose time includes a graph capture
    (its own or its twin's) is left out of the ratios and listed in ``mismatches``."""
    twins = {(c["context_tokens"], c["prefill_tokens"]): c for c in alone}
    rows, mismatches = [], []
    mixed_chunks = [[c["context_tokens"], c["prefill_tokens"]] for c in mixed]
    alone_chunks = [[c["context_tokens"], c["prefill_tokens"]] for c in alone]
    if mixed_chunks != alone_chunks:
        mismatches.append(
            f"chunks (context, tokens) differ: mixed {mixed_chunks}, alone {alone_chunks}"
        )
    for c in mixed:
        where = f"{c['prefill_tokens']} prompt tokens after {c['context_tokens']}"
        twin = twins.get((c["context_tokens"], c["prefill_tokens"]))
        if twin is None:
            mismatches.append(f"mixed step of {where}: no alone step of that chunk")
        elif c["decodes"] != decodes:
            mismatches.append(f"mixed step of {where}: {c['decodes']} decodes, not {decodes}")
        elif c["captured"] or twin["captured"]:
            mismatches.append(f"mixed step of {where}: a graph capture is in its time")
        else:
            parts = decode_s + twin["seconds"]
            rows.append({
                "prefill_tokens": c["prefill_tokens"],
                "context_tokens": c["context_tokens"],
                "step_s": c["seconds"],
                "decode_part_s": decode_s,
                "prefill_part_s": twin["seconds"],
                "ratio": c["seconds"] / parts,
                "graph": c["graph"],
                "prefill_part_graph": twin["graph"],
            })  # fmt: skip
    tokens = sum(r["prefill_tokens"] for r in rows)
    return {
        "mixed_chunks": mixed_chunks,
        "alone_chunks": alone_chunks,
        "steps": rows,
        "max_ratio": max((r["ratio"] for r in rows), default=None),
        "token_weighted_ratio": (
            sum(r["ratio"] * r["prefill_tokens"] for r in rows) / tokens if tokens else None
        ),
        "mismatches": mismatches,
    }


def profiled_steps_of(engine: Engine, run: Any) -> list[StepRecord]:
    """The runner's records of the steps ``run()`` makes (captures included, marked)."""
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    runner.profile.start()
    run()
    runner.profile.enabled = False
    return runner.profile.steps


def run_alone(engine: Engine, prompt: list[int]) -> list[StepRecord]:
    """The prompt by itself, one token generated: its steps."""
    return profiled_steps_of(engine, lambda: engine.generate([prompt], 1, ignore_eos=True))


def run_mixed(engine: Engine, short: list[list[int]], prompt: list[int]) -> list[StepRecord]:
    """The short prompts until every one has its first token (so all are decoding), then
    ``prompt`` (one token generated) beside them until everything is done: the steps
    from the prompt's arrival on, its chunks' mixed steps and then decode-only ones."""
    options = RequestOptions(max_tokens=MIXED_DECODE_LIMIT, ignore_eos=True)
    prefilling = {engine.add_request(p, options) for p in short}
    while prefilling:
        for update in engine.step():
            if update.num_output_tokens > 0 or update.finished:
                prefilling.discard(update.request_id)

    def rest() -> None:
        engine.add_request(prompt, RequestOptions(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests:
            engine.step()

    return profiled_steps_of(engine, rest)


def mixed_cell(model: HybridModel, geometry: Any, decodes: int) -> dict[str, Any]:
    """The long prompt alone in chunks of ``step - decodes`` tokens, then the same prompt
    arriving while ``decodes`` short requests decode under a step of ``step`` tokens;
    each run once untimed first (the mixed steps' shapes compile Triton variants and
    capture graphs that nothing else needs, about a second each)."""
    vocab = geometry.vocab_size
    step = MIXED_STEP_TOKENS
    chunk = alone_step_tokens(step, decodes)
    short = random_prompts(decodes, MIXED_SHORT_TOKENS, vocab, 3)
    (long,) = random_prompts(1, MIXED_PROMPT_TOKENS, vocab, 4)
    alone_engine = engine_for(model, cache_budget(geometry, 1, MIXED_PROMPT_TOKENS), chunk, 1)
    run_alone(alone_engine, long)
    alone = prompt_chunks(run_alone(alone_engine, long))
    alone_engine.backing.close()
    budget = cache_budget(
        geometry, decodes, MIXED_SHORT_TOKENS + MIXED_DECODE_LIMIT
    ) + cache_budget(geometry, 1, MIXED_PROMPT_TOKENS)
    engine = engine_for(model, budget, step, decodes + 1)
    run_mixed(engine, short, long)
    steps = run_mixed(engine, short, long)
    engine.backing.close()
    decode = [
        s.seconds
        for s in steps
        if s.num_prefill_tokens == 0 and s.num_decode_requests == decodes and not s.captured
    ]
    head = {"decodes": decodes, "prompt_tokens": MIXED_PROMPT_TOKENS, "step_tokens": step,
            "alone_step_tokens": chunk}  # fmt: skip
    if not decode:
        return {**head, "steps": [], "error": "no decode-only step of the whole batch was recorded"}
    decode_s = statistics.median(decode)
    comparison = compare_steps(prompt_chunks(steps), alone, decode_s, decodes)
    return {**head, "decode_alone_s": decode_s, "num_decode_steps": len(decode), **comparison}


def long_cell(model: HybridModel, geometry: Any, tokens: int, step: int) -> dict[str, Any]:
    budget = cache_budget(geometry, 1, tokens)
    engine = engine_for(model, budget, step, 1)
    vocab = geometry.vocab_size
    # warm-up: a prompt as long (its chunks' block tables grow through every graph width
    # and Triton variant the timed one needs); its own time is the cold first prompt's
    cold_s = timed_generate(engine, random_prompts(1, tokens, vocab, 5), 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = timed_generate(engine, random_prompts(1, tokens, vocab, 6), 1)
    peak = torch.cuda.max_memory_allocated()
    engine.backing.close()
    return {
        "prompt_tokens": tokens,
        "step_tokens": step,
        "ttft_s": seconds,
        "cold_ttft_s": cold_s,
        "tokens_per_s": tokens / seconds,
        "cache_budget_bytes": budget,
        "allocated_before_bytes": base,
        "peak_allocated_bytes": peak,
        "peak_above_before_bytes": peak - base,
    }


def run_model(args: argparse.Namespace, name: str, peak_flops: float) -> dict[str, Any]:
    config = transformers_config(name)
    model = build_model(config, torch.device("cuda"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    probe = engine_for(model, 256 << 20, 1024, 1)
    geometry = probe.geometry
    probe.backing.close()
    result: dict[str, Any] = {"model": name, "weight_bytes": weights, "cells": []}
    for cell in PREFILL_CELLS:
        row = prefill_cell(model, geometry, cell, peak_flops)
        print(f"{name} {cell}: {row['tokens_per_s']:,.0f} tok/s, "
              f"{100 * row['share_of_peak']:.1f}% of peak", flush=True)  # fmt: skip
        result["cells"].append(row)
    if not args.skip_mixed:
        result["mixed"] = mixed_cell(model, geometry, args.mixed_decodes)
        print(f"{name} mixed: {result['mixed']}", flush=True)
    if not args.skip_long:
        result["long"] = long_cell(model, geometry, args.long_tokens, args.long_step)
        print(f"{name} long: {result['long']}", flush=True)
    del model
    torch.cuda.empty_cache()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    name = torch.cuda.get_device_name()
    profile = get_profile(gpu_profile(name))
    return {
        "gpu": name,
        "torch": torch.__version__,
        "peak_bf16_flops_per_s": profile.bf16_flops_per_s,
        "models": [run_model(args, m, profile.bf16_flops_per_s) for m in args.models],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return measure_or_redraw(args, "benchmarks.prefill", lambda: run(args), markdown)


def markdown(result: dict[str, Any]) -> str:
    peak = result["peak_bf16_flops_per_s"]
    lines = [
        f"{result['gpu']}, torch {result['torch']}; share of the dense bf16 peak "
        f"({peak / 1e12:.0f} TFLOP/s) counting linear, attention and recurrent FLOPs.",
        "",
        "| model geometry | prompts x tokens, step | s | prefill tok/s | TFLOP/s | "
        "share of peak | linear / attention / recurrent FLOPs |",
        "|---|---|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for model in result["models"]:
        for c in model["cells"]:
            f = c["flops"]
            split = " / ".join(f"{f[k] / 1e12:.1f}T" for k in ("linear", "attention", "recurrent"))
            lines.append(
                f"| {model['model']} | {c['num_prompts']} x {c['prompt_tokens']:,}, "
                f"{c['step_tokens']:,} | {c['seconds']:.3f} | {c['tokens_per_s']:,.0f} | "
                f"{c['flops_per_s'] / 1e12:.0f} | {100 * c['share_of_peak']:.1f}% | {split} |"
            )
    mixed = [(m["model"], m["mixed"]) for m in result["models"] if "mixed" in m]
    if any("steps" in m for _, m in mixed):
        lines += mixed_markdown([(name, m) for name, m in mixed if "steps" in m])
    if any("steps" not in m for _, m in mixed):  # results from before step-for-step pairs
        lines += median_mixed_markdown([(name, m) for name, m in mixed if "steps" not in m])
    longs = [(m["model"], m["weight_bytes"], m["long"]) for m in result["models"] if "long" in m]
    if longs:
        lines += ["", "| model geometry | prompt tokens, step | time to first token s "
                  "(first prompt, compiling and capturing) | "
                  "prefill tok/s | weights | cache budget | peak allocated during the prompt |",
                  "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, weights, c in longs:
            cold = f" ({c['cold_ttft_s']:.2f})" if "cold_ttft_s" in c else ""
            lines.append(
                f"| {name} | {c['prompt_tokens']:,}, {c['step_tokens']:,} | "
                f"{c['ttft_s']:.2f}{cold} | "
                f"{c['tokens_per_s']:,.0f} | {format_bytes(weights)} | "
                f"{format_bytes(c['cache_budget_bytes'])} | "
                f"{format_bytes(c['peak_allocated_bytes'])} |"
            )
    return "\n".join(lines)


def mixed_markdown(mixed: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Every mixed step against its decode part plus the alone step of the same chunk;
    then per model the largest and the token-weighted ratio, and any mismatch."""
    lines = ["", "| model geometry | decodes | prompt tokens | context before | mixed step ms | "
             "decode alone ms | same chunk alone ms | mixed / (decode + chunk alone) | "
             "graph: mixed / alone |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, m in mixed:
        for r in m["steps"]:
            lines.append(
                f"| {name} | {m['decodes']} | {r['prefill_tokens']:,} | "
                f"{r['context_tokens']:,} | {1e3 * r['step_s']:.2f} | "
                f"{1e3 * r['decode_part_s']:.2f} | {1e3 * r['prefill_part_s']:.2f} | "
                f"{r['ratio']:.2f}x | {r['graph']} / {r['prefill_part_graph']} |"
            )
    lines += ["", "| model geometry | prompt tokens, step (alone) | mixed steps compared | "
              "largest ratio | token-weighted ratio |", "|---|---|---:|---:|---:|"]  # fmt: skip
    notes = []
    for name, m in mixed:
        shape = f"{m['prompt_tokens']:,}, {m['step_tokens']:,} ({m['alone_step_tokens']:,})"
        if "error" in m:
            lines.append(f"| {name} | {shape} | {m['error']} | | |")
            continue
        worst, weighted = m["max_ratio"], m["token_weighted_ratio"]
        lines.append(
            f"| {name} | {shape} | {len(m['steps'])} | "
            f"{'n/a' if worst is None else f'{worst:.2f}x'} | "
            f"{'n/a' if weighted is None else f'{weighted:.2f}x'} |"
        )
        notes += [f"- {name}: {text}" for text in m["mismatches"]]
    return lines + ([""] + notes if notes else [])


def median_mixed_markdown(mixed: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The table of results from before step-for-step pairs: the median mixed step
    against the median decode step plus the chunk priced per token from the prompt's
    own run (full steps), which mixes steps of different sizes."""
    lines = ["", "| model geometry | decodes | decode step ms | prefill chunk tokens | "
             "mixed step ms | mixed / (decode + chunk alone) | mixed steps in graphs |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, m in mixed:
        if "error" in m:
            lines.append(f"| {name} | {m['decodes']} | {m['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {m['decodes']} | {1e3 * m['decode_step_s']:.2f} | "
            f"{m['mixed_prefill_tokens_median']:,.0f} | {1e3 * m['mixed_step_s']:.2f} | "
            f"{m['ratio_to_parts']:.2f}x | {m['mixed_graph']} |"
        )
    return lines


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
