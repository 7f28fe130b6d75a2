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
- **a mixed step**: ``--mixed-decodes`` short requests, and one long prompt queued behind
  them whose chunks then share steps with their decodes; the median mixed step (prefill
  chunk + those decodes) against the median decode step of the same batch alone plus the
  prefill chunk's time alone (the same prompt run by itself, per token), as the issue's
  "at most 1.2x" asks.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.fast_runner import FastModelRunner
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import Mamba2Mixer, PagedAttention
from avmp.sim.timing import get_profile
from avmp.units import format_bytes
from benchmarks.common import gpu_profile, read_result, write_result
from benchmarks.engine import build_model, profiled_generate, random_prompts, transformers_config

DEFAULT_MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
# (prompts, tokens each, step budget): the table
PREFILL_CELLS = ((1, 16384, 8192), (1, 32768, 8192), (8, 4096, 8192), (8, 4096, 16384))
LONG_TOKENS = 131072
MIXED_DECODES = 64
MIXED_PROMPT_TOKENS = 16384
MIXED_STEP_TOKENS = 8192
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


def mixed_cell(model: HybridModel, geometry: Any, decodes: int) -> dict[str, Any]:
    """A long prompt alone, then the same prompt queued behind ``decodes`` short ones: once
    the short prompts are prefilled, the long one's chunks share steps with their decodes
    (first come, first served), and they keep decoding after it."""
    vocab = geometry.vocab_size
    decode_limit = 64
    budget = cache_budget(geometry, decodes, 512 + decode_limit) + cache_budget(
        geometry, 1, MIXED_PROMPT_TOKENS + decode_limit
    )
    engine = engine_for(model, budget, MIXED_STEP_TOKENS, decodes + 1)
    runner = engine.runner
    assert isinstance(runner, FastModelRunner)
    short = random_prompts(decodes, 512, vocab, 3)
    long = random_prompts(1, MIXED_PROMPT_TOKENS, vocab, 4)
    # warm-up: the same runs once (the mixed steps' shapes compile Triton variants that
    # nothing else needs, about a second each)
    engine.generate(long, 1, ignore_eos=True)
    engine.generate(short + long, decode_limit, ignore_eos=True)
    alone, _ = profiled_generate(engine, runner, long, 1)
    prefill_alone = [row for row in alone if row[0] > 0]
    s_per_token = sum(row[6] for row in prefill_alone) / sum(row[0] for row in prefill_alone)
    rows, _ = profiled_generate(engine, runner, short + long, decode_limit)
    engine.backing.close()
    decode = [row[6] for row in rows if row[0] == 0 and row[1] >= decodes]
    mixed = [row for row in rows if row[0] > 0 and row[1] >= decodes]
    if not decode or not mixed:
        return {"decodes": decodes, "error": "no decode-only or no mixed step was recorded"}
    decode_s = statistics.median(decode)
    mixed_s = statistics.median(row[6] for row in mixed)
    chunk = statistics.median(row[0] for row in mixed)
    alone_s = decode_s + chunk * s_per_token
    return {
        "decodes": decodes,
        "prompt_tokens": MIXED_PROMPT_TOKENS,
        "step_tokens": MIXED_STEP_TOKENS,
        "decode_step_s": decode_s,
        "prefill_s_per_token": s_per_token,
        "mixed_prefill_tokens_median": chunk,
        "mixed_step_s": mixed_s,
        "num_mixed_steps": len(mixed),
        "mixed_graph": all(row[7] for row in mixed),
        "ratio_to_parts": mixed_s / alone_s,
    }


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(read_result(args.markdown)))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.prefill needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    profile = get_profile(gpu_profile(name))
    result = {
        "gpu": name,
        "torch": torch.__version__,
        "peak_bf16_flops_per_s": profile.bf16_flops_per_s,
        "models": [run_model(args, m, profile.bf16_flops_per_s) for m in args.models],
    }
    if args.out:
        print(f"wrote {write_result(Path(args.out), result)}")
    print(markdown(result))
    return 0


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
    if mixed:
        lines += ["", "| model geometry | decodes | decode step ms | prefill chunk tokens | "
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


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
