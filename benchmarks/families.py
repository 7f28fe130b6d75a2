"""Gated DeltaNet families on one GPU: decode at batch 64 and prefill of one 16k-token
prompt, as shares of the decode roofline and the dense bf16 peak, against transformers'
``generate`` on the same model (issue 17).

Geometries (random bf16 weights built on the GPU as `benchmarks.engine` builds them, the
zoo config's text model, vocabulary kept):

- ``qwen3.5-4b``: the zoo's Qwen3.5-4B text model as published.
- ``qwen3-next-80b-a3b-128e``: Qwen3-Next-80B-A3B with 128 of its 512 routed experts per
  layer and every other size as published (48 layers, hidden 2048, top-10 routing, expert
  and shared expert widths 512, the DeltaNet and attention heads), so a token does the
  work it does in the real model; about 22B parameters, so our copy and transformers'
  fit one H200 together (80B would not fit once).

Cells, per geometry, on the engine with its Triton kernels:

- **decode**: ``--batch`` prompts of ``--prompt-len`` random tokens, ``--decode-tokens``
  generated each (after a warm-up run of the same shapes); the median decode step of the
  whole batch (`benchmarks.engine.engine_cell`). Its roofline is the bytes a step must
  move over the device-to-device copy bandwidth measured in the run
  (`benchmarks.engine.decode_roofline`: weights once, KV context, each request's conv and
  recurrent state read and written), less the routed experts a step is not expected to
  touch: with ``E`` experts, top-``k`` routing and ``B`` tokens, an expert is used with
  probability ``1 - (1 - k/E)^B`` under uniform routing (random weights route nearly
  uniformly).
- **prefill**: one prompt of ``--prefill-tokens`` in one step (after a warm-up of the same
  length), timed from the call to its first token. FLOPs the model must do: every
  linear layer a token passes (2 x in x out; of the experts only the top-k a token is
  routed to, plus the router and the shared expert; the LM head once), causal attention
  (4 x heads x head dim per (query, key) pair), and the gated delta rule in its
  recurrent form (per token and value head 7 x dk x dv: decay, prediction ``k^T S``,
  rank-1 update, readout ``q^T S``) with its causal conv (2 x channels x width); over the
  time, then over the GPU's dense bf16 peak (the simulator's profile of that GPU).

transformers runs the same model (our weights copied into its module tree; its experts
are fused tensors) through ``generate`` (`benchmarks.engine.hf_cell`): without the
flash-linear-attention package it runs its torch fallbacks of the delta rule, chunked
for prefill and recurrent for decode.

``--smoke`` runs every cell on tiny widths (`avmp.engine.tiny`) and 4 layers with tiny
counts, on the CPU under Triton's interpreter when there is no GPU: a test of the
script, not a measurement.

Usage (on the device machine)::

    PYTHONPATH=src python3 -m benchmarks.families --out $OUT/families_h200.json.gz
    python3 -m benchmarks.families --markdown benchmarks/results/families_h200.json.gz
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.models.base import HybridModel
from avmp.engine.models.qwen3_next import GatedDeltaNet, SparseMoe
from avmp.engine.tiny import tiny_config
from avmp.models.zoo import zoo_config
from avmp.sim.timing import get_profile
from benchmarks.common import (
    copy_bytes_per_s,
    gpu_profile,
    read_result,
    wall_ms,
    write_result,
)
from benchmarks.engine import build_model, decode_roofline, engine_cell, hf_cell, random_prompts
from benchmarks.prefill import attention_flops_per_pair, cache_budget, causal_pairs


@dataclass(frozen=True)
class Geometry:
    """A benchmarked geometry: a zoo config, what was changed in it and why."""

    zoo_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = "as published"


GEOMETRIES = {
    "qwen3.5-4b": Geometry("qwen3.5-4b"),
    "qwen3-next-80b-a3b-128e": Geometry(
        "qwen3-next-80b-a3b",
        {"num_experts": 128},
        "128 of 512 routed experts per layer, every other size as published",
    ),
}
SMOKE_LAYERS = 4  # three DeltaNet layers and one attention layer (full attention every 4th)


@dataclass(frozen=True)
class Counts:
    """How much work each cell does."""

    batch: int = 64
    prompt_len: int = 512
    decode_tokens: int = 32
    hf_decode_tokens: int = 16
    prefill_tokens: int = 16384


SMOKE_COUNTS = Counts(batch=2, prompt_len=8, decode_tokens=3, hf_decode_tokens=2,
                      prefill_tokens=70)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Counts()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the tables of a results file")
    parser.add_argument("--models", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len)
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    parser.add_argument("--hf-decode-tokens", type=int, default=defaults.hf_decode_tokens)
    parser.add_argument("--prefill-tokens", type=int, default=defaults.prefill_tokens)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny widths, 4 layers and tiny counts (CPU: Triton's interpreter)")
    return parser.parse_args(argv)


def counts_of(args: argparse.Namespace) -> Counts:
    if args.smoke:
        return SMOKE_COUNTS
    return Counts(args.batch, args.prompt_len, args.decode_tokens, args.hf_decode_tokens,
                  args.prefill_tokens)  # fmt: skip


# -- models --------------------------------------------------------------------------------


def family_config(geometry: Geometry, smoke: bool) -> Any:
    """The geometry's transformers config: a multimodal zoo entry's text model, with the
    geometry's overrides; tiny widths and `SMOKE_LAYERS` layers for ``smoke``."""
    from transformers import AutoConfig

    raw = zoo_config(geometry.zoo_name)
    if isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "model_type": f"{raw['model_type']}_text"}
    raw = {**raw, **geometry.overrides}
    if smoke:
        config = tiny_config({**raw, "num_hidden_layers": SMOKE_LAYERS})
        config.dtype = torch.bfloat16
        return config
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_") and k != "model_type"}
    return AutoConfig.for_model(raw["model_type"], **{**kwargs, "dtype": "bfloat16"})


_FUSED_EXPERTS = re.compile(r"(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)")


@torch.no_grad()
def hf_model(config: Any, ours: HybridModel, device: torch.device) -> Any:
    """transformers' model of ``config`` holding our weights: same names, except its
    routed experts, fused per layer (``gate_up_proj [E, 2I, H]`` is each expert's gate
    then up projection, ``down_proj [E, H, I]``), filled expert by expert.

    Raises:
        RuntimeError: a tensor of one model has no counterpart in the other.
    """
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    source = ours.state_dict()
    used: set[str] = set()
    missing = []
    for name, tensor in hf.state_dict().items():
        fused = _FUSED_EXPERTS.fullmatch(name)
        if name in source:
            tensor.copy_(source[name])
            used.add(name)
        elif fused is not None:
            used.update(_fill_experts(tensor, fused["prefix"], fused["kind"], source))
        else:
            missing.append(name)
    unused = sorted(set(source) - used)
    if missing or unused:
        raise RuntimeError(f"weights do not line up: theirs without ours {missing[:5]}, "
                           f"ours unused {unused[:5]}")  # fmt: skip
    return hf.eval()


def _fill_experts(
    fused: torch.Tensor, prefix: str, kind: str, source: dict[str, torch.Tensor]
) -> list[str]:
    """Copy every expert's matrices of one layer into its fused tensor; their names."""
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    names = []
    for expert in range(fused.shape[0]):
        rows = 0
        for part in parts:
            name = f"{prefix}.{expert}.{part}.weight"
            weight = source[name]
            fused[expert, rows : rows + weight.shape[0]].copy_(weight)
            rows += weight.shape[0]
            names.append(name)
    return names


# -- what the model must do ----------------------------------------------------------------


def linear_flops_per_token(model: HybridModel) -> int:
    """2 x in x out over the linear layers a token passes: of the routed experts the
    top-k it is sent to, plus the router; the LM head is counted per sample."""
    head = getattr(model, "lm_head", None)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, SparseMoe):
            expert = sum(2 * m.in_features * m.out_features for m in module.experts[0].modules()
                         if isinstance(m, nn.Linear))  # fmt: skip
            total += module.gate.top_k * expert + 2 * module.gate.weight.numel()
        elif isinstance(module, nn.Linear) and ".experts." not in name and module is not head:
            total += 2 * module.in_features * module.out_features
    return total


def delta_rule_flops_per_token(model: HybridModel) -> int:
    """The gated delta rule's recurrent form per token (7 x dk x dv per value head) and
    its causal conv (2 x channels x width), summed over the DeltaNet layers."""
    return sum(
        7 * m.num_v_heads * m.head_k_dim * m.head_v_dim + 2 * m.conv_dim * m.d_conv
        for m in model.modules()
        if isinstance(m, GatedDeltaNet)
    )


def prefill_flops(model: HybridModel, tokens: int) -> dict[str, int]:
    """FLOPs of one prompt of ``tokens`` tokens, by kind."""
    head = getattr(model, "lm_head", None)
    head_flops = 0 if head is None else 2 * head.in_features * head.out_features
    return {
        "linear": linear_flops_per_token(model) * tokens + head_flops,
        "attention": attention_flops_per_pair(model) * causal_pairs(tokens),
        "recurrent": delta_rule_flops_per_token(model) * tokens,
    }


def untouched_expert_bytes(model: HybridModel, batch: int) -> float:
    """Expected bytes of routed experts that no token of a ``batch``-token decode step is
    sent to, under uniform routing."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, SparseMoe):
            experts = len(module.experts)
            each = sum(p.numel() * p.element_size() for p in module.experts[0].parameters())
            used = 1.0 - (1.0 - module.gate.top_k / experts) ** batch
            total += experts * each * (1.0 - used)
    return total


def moe_decode_roofline(
    engine: Engine, batch: int, context_tokens: int, bandwidth: float
) -> dict[str, float]:
    """`decode_roofline` less the routed experts the step is not expected to read."""
    roof = decode_roofline(engine, batch, context_tokens, bandwidth)
    skipped = untouched_expert_bytes(engine.model, batch)
    if skipped:
        roof["weight_bytes"] -= skipped
        roof["bytes"] -= skipped
        roof["untouched_expert_bytes"] = skipped
        roof["step_s"] = roof["bytes"] / bandwidth
        roof["tokens_per_s"] = batch / roof["step_s"]
    return roof


# -- cells ---------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(model: HybridModel, memory: int, device: torch.device, seqs: int, step: int) -> Engine:
    """An engine on the Triton kernels. Its budget holds every request of a cell, so none
    is preempted: ``recompute`` spares the probe prefill that ``auto`` runs when built."""
    config = EngineConfig(memory, device=str(device), kernels="triton", max_num_seqs=seqs,
                          max_num_batched_tokens=step, preemption="recompute")  # fmt: skip
    return Engine(model, config)


def decode_cell(
    model: HybridModel, geometry: Any, counts: Counts, device: torch.device, bandwidth: float
) -> dict[str, Any]:
    tokens = counts.prompt_len + counts.decode_tokens
    budget = cache_budget(geometry, counts.batch, tokens)
    engine = _engine(model, budget, device, counts.batch, 8192)
    cell = engine_cell(engine, counts.batch, counts.prompt_len, counts.decode_tokens, seed=1)
    cell.pop("steps")  # the per-step rows: the calibration's, not this table's
    cell["roofline"] = moe_decode_roofline(
        engine, counts.batch, cell["median_decode_context_tokens"], bandwidth
    )
    cell["roofline_fraction"] = cell["decode_tokens_per_s"] / cell["roofline"]["tokens_per_s"]
    engine.backing.close()
    return cell


def prefill_cell(
    model: HybridModel, geometry: Any, tokens: int, device: torch.device, peak: float | None
) -> dict[str, Any]:
    """One prompt of ``tokens`` in one step, after a warm-up of the same length."""
    engine = _engine(model, cache_budget(geometry, 1, tokens), device, 1, tokens)
    vocab = geometry.vocab_size
    engine.generate(random_prompts(1, tokens, vocab, 3), 1, ignore_eos=True)
    prompt = random_prompts(1, tokens, vocab, 4)
    _synchronize(device)
    start = time.perf_counter()
    engine.generate(prompt, 1, ignore_eos=True)
    _synchronize(device)
    seconds = time.perf_counter() - start
    engine.backing.close()
    flops = prefill_flops(model, tokens)
    per_s = sum(flops.values()) / seconds
    return {
        "prompt_tokens": tokens,
        "step_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "flops": flops,
        "flops_per_s": per_s,
        "share_of_peak": None if peak is None else per_s / peak,
    }


def transformers_cells(
    hf: Any, counts: Counts, vocab: int, device: torch.device
) -> dict[str, Any]:
    decode = hf_cell(hf, counts.batch, counts.prompt_len, counts.hf_decode_tokens, vocab, 5,
                     device)  # fmt: skip
    prefill = hf_cell(hf, 1, counts.prefill_tokens, 1, vocab, 6, device)
    return {"decode": decode, "prefill": prefill}


def run_geometry(
    args: argparse.Namespace, name: str, device: torch.device, bandwidth: float,
    peak: float | None,
) -> dict[str, Any]:
    """Every cell of one geometry: the engine's, then transformers' on the same weights."""
    geometry_spec = GEOMETRIES[name]
    counts = counts_of(args)
    config = family_config(geometry_spec, args.smoke)
    model = build_model(config, device)
    probe = _engine(model, 64 << 20, device, 1, 1024)
    geometry = probe.geometry
    probe.backing.close()
    result: dict[str, Any] = {
        "model": name,
        "zoo": geometry_spec.zoo_name,
        "changed": geometry_spec.note,
        "overrides": geometry_spec.overrides,
        "num_params": sum(p.numel() for p in model.parameters()),
        "ssm_dtype": geometry.ssm_dtype,
        "state_bytes_per_request": geometry.state_bytes_per_request,
        "kv_bytes_per_token": geometry.kv_bytes_per_token,
    }
    print(f"== {name}: {result['num_params'] / 1e9:.2f} B parameters", flush=True)
    result["decode"] = decode_cell(model, geometry, counts, device, bandwidth)
    print(f"{name} decode: {result['decode']['decode_tokens_per_s']:,.0f} tok/s, "
          f"{result['decode']['roofline_fraction']:.0%} of roofline", flush=True)  # fmt: skip
    result["prefill"] = prefill_cell(model, geometry, counts.prefill_tokens, device, peak)
    print(f"{name} prefill: {result['prefill']['tokens_per_s']:,.0f} tok/s", flush=True)
    if not args.skip_transformers:
        hf = hf_model(config, model, device)
        del model
        _free(device)
        result["transformers"] = transformers_cells(hf, counts, geometry.vocab_size, device)
        print(f"{name} transformers: {result['transformers']}", flush=True)
        del hf
    _free(device)
    return result


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device(args: argparse.Namespace) -> torch.device:
    """CUDA; without it the smoke run goes to the CPU under Triton's interpreter, which
    must be switched on before triton is first imported."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not args.smoke:
        raise SystemExit("benchmarks.families needs a CUDA GPU (or --smoke, on the CPU)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise SystemExit("--smoke on the CPU: set TRITON_INTERPRET=1 before triton loads")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    device = _device(args)
    import transformers
    import triton

    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = get_profile(gpu_profile(name)).bf16_flops_per_s if cuda else None
    bandwidth = copy_bytes_per_s(device, (1 << 31) if cuda else (1 << 24),
                                 None if cuda else wall_ms)  # fmt: skip
    results: dict[str, Any] = {
        "device": name,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "copy_bytes_per_s": bandwidth,
        "peak_bf16_flops_per_s": peak,
        "counts": vars(counts_of(args)),
        "models": [],
    }
    for model in args.models:
        try:
            results["models"].append(run_geometry(args, model, device, bandwidth, peak))
        except Exception as error:  # record it and go on with the next geometry
            traceback.print_exc()
            results.setdefault("errors", []).append(f"{model}: {error!r}"[:500])
        if args.out is not None:
            write_result(args.out, results)
    print(markdown(results))
    return 1 if results.get("errors") else 0


# -- report --------------------------------------------------------------------------------


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _ratio(ours: float, theirs: dict[str, Any] | None, key: str) -> tuple[str, str]:
    if not theirs or key not in theirs:
        return "n/a", "n/a"
    return f"{theirs[key]:,.0f}", f"{ours / theirs[key]:.1f}x"


def markdown(results: dict[str, Any]) -> str:
    counts = results["counts"]
    peak = results["peak_bf16_flops_per_s"]
    peak_text = "no peak (CPU)" if peak is None else f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    lines = [
        f"{results['device']}{' (smoke run)' if results['smoke'] else ''}, torch "
        f"{results['torch']}, transformers {results['transformers']}; copy bandwidth "
        f"{results['copy_bytes_per_s'] / 1e12:.2f} TB/s, {peak_text}. Decode: batch "
        f"{counts['batch']} after {counts['prompt_len']}-token prompts; prefill: one "
        f"{counts['prefill_tokens']:,}-token prompt in one step.",
        "",
        "| geometry | params | decode tok/s | roofline tok/s | share | transformers tok/s "
        "| engine / transformers | prefill tok/s | TFLOP/s | share of peak "
        "| transformers prefill tok/s | engine / transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for m in results["models"]:
        d, p, hf = m["decode"], m["prefill"], m.get("transformers") or {}
        hf_decode, decode_x = _ratio(d["decode_tokens_per_s"], hf.get("decode"),
                                     "decode_tokens_per_s")  # fmt: skip
        hf_prefill, prefill_x = _ratio(p["tokens_per_s"], hf.get("prefill"), "prefill_tokens_per_s")
        lines.append(
            f"| {m['model']} ({m['changed']}) | {m['num_params'] / 1e9:.1f}B | "
            f"{d['decode_tokens_per_s']:,.0f} | {d['roofline']['tokens_per_s']:,.0f} | "
            f"{_share(d['roofline_fraction'])} | {hf_decode} | {decode_x} | "
            f"{p['tokens_per_s']:,.0f} | {p['flops_per_s'] / 1e12:.1f} | "
            f"{_share(p['share_of_peak'])} | {hf_prefill} | {prefill_x} |"
        )
    for error in results.get("errors", []):
        lines.append(f"\nerror: {error}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
