"""Decode-batch linear layers on a CUDA GPU: cuBLAS (torch F.linear) against a sweep of
skinny_linear configs, as achieved weight bandwidth.

Shapes: every nn.Linear weight of Nemotron-H-8B and Granite-4.0-H-Micro, derived from
their zoo configs (``model_linears``; a test checks them against the engine's modules),
bf16, no bias, at M = 1, 8, 32, 64, 128, 256 tokens. Per (shape, M):

1. cuBLAS (``F.linear``) and skinny_linear's ``default_config``;
2. every candidate tile of the grid (``candidate_tiles``: block_n 16-128, block_k
   64-256, 4 or 8 warps, 3-5 stages, pruned by shared memory, registers and the
   activation re-reads), each at the split the default rules give it;
3. the three fastest tiles again at every split_k in 1, 2, 4, 8.

Every config is first checked against F.linear (relative error) and skipped, with its
error recorded, when it is wrong or fails to compile or launch. Sweep timings are
``triton.testing.do_bench`` medians with a short rep (the L2 cache is flushed before
each call, as a decode step finds it: a model's weights never fit in L2). The reported
figures time cuBLAS, the default and the best config again, replayed from CUDA graphs as
the engine runs them, with a longer rep (a winner picked on short runs is biased
fast). TB/s = weight bytes / time; the device-to-device copy bandwidth of the same run
(bytes read + written) is the ceiling. The JSON keeps every timing and, under
``table``, the best config per (N x K, M): what the engine loads.

After ``--budget-s`` seconds the remaining cells time cuBLAS and the default config
only (marked ``swept: false``); results are written after every cell.

    PYTHONPATH=src python3 -m benchmarks.skinny_gemm \
        --out benchmarks/results/skinny_gemm_h100.json.gz
    PYTHONPATH=src python3 -m benchmarks.skinny_gemm \
        --markdown benchmarks/results/skinny_gemm_h100.json.gz

CPU check of the same code path (one tiny shape, Triton's interpreter, wall-clock times):

    TRITON_INTERPRET=1 PYTHONPATH=src python3 -m benchmarks.skinny_gemm --device cpu --quick \
        --out /tmp/skinny_gemm.json

The measuring lives in `benchmarks.skinny_gemm_measure`, imported only to measure: it
needs Triton, which drawing a saved result's tables (``--markdown FILE``) and
``--list-linears`` do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avmp.models.zoo import zoo_config
from benchmarks.common import read_result

MODELS = ("nemotron-h-8b", "granite-4.0-h-micro")
BATCHES = (1, 8, 32, 64, 128, 256)


@dataclass(frozen=True)
class Linear:
    """One weight shape of a model and how many matrices of it a decode step reads."""

    model: str
    layer: str
    n: int  # out features
    k: int  # in features
    count: int


def nemotron_h_linears(name: str, cfg: dict[str, Any]) -> list[Linear]:
    """Nemotron-H: the pattern's M (Mamba2), - (MLP, relu²) and * (attention) layers."""
    pattern = cfg["hybrid_override_pattern"]
    if set(pattern) - set("M-*"):
        raise ValueError(f"{name}: layer kinds {set(pattern) - set('M-*')} not covered")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    d_inner = cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    in_proj = 2 * d_inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"] + cfg["mamba_num_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    mamba, mlp, attn = pattern.count("M"), pattern.count("-"), pattern.count("*")
    return [
        Linear(name, "mamba in_proj", in_proj, hidden, mamba),
        Linear(name, "mamba out_proj", hidden, d_inner, mamba),
        Linear(name, "mlp up", cfg["intermediate_size"], hidden, mlp),
        Linear(name, "mlp down", hidden, cfg["intermediate_size"], mlp),
        Linear(name, "attention q", heads * head_dim, hidden, attn),
        Linear(name, "attention k, v", kv, hidden, 2 * attn),
        Linear(name, "attention o", hidden, heads * head_dim, attn),
        Linear(name, "lm_head", cfg["vocab_size"], hidden, 1),
    ]


def granite_h_linears(name: str, cfg: dict[str, Any]) -> list[Linear]:
    """Granite-4.0-H: Mamba2 or attention layers, each followed by the shared MLP (gate
    and up stacked in one input_linear)."""
    if cfg.get("num_local_experts", 0):
        raise ValueError(f"{name}: mixture-of-experts layers not covered")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    d_inner = cfg["mamba_expand"] * hidden
    groups_state = 2 * cfg["mamba_n_groups"] * cfg["mamba_d_state"]
    in_proj = 2 * d_inner + groups_state + cfg["mamba_n_heads"]
    mlp = cfg["shared_intermediate_size"]
    layers = cfg["layer_types"]
    mamba, attn = layers.count("mamba"), layers.count("attention")
    return [
        Linear(name, "mamba in_proj", in_proj, hidden, mamba),
        Linear(name, "mamba out_proj", hidden, d_inner, mamba),
        Linear(name, "shared_mlp input_linear", 2 * mlp, hidden, len(layers)),
        Linear(name, "shared_mlp output_linear", hidden, mlp, len(layers)),
        Linear(name, "attention q", heads * head_dim, hidden, attn),
        Linear(name, "attention k, v", cfg["num_key_value_heads"] * head_dim, hidden, 2 * attn),
        Linear(name, "attention o", hidden, heads * head_dim, attn),
        Linear(name, "lm_head", cfg["vocab_size"], hidden, 1),
    ]


LINEARS_BY_TYPE = {"nemotron_h": nemotron_h_linears, "granitemoehybrid": granite_h_linears}


def model_linears(names: Iterable[str]) -> list[Linear]:
    """Every weight shape of the named zoo models, from their configs."""
    linears: list[Linear] = []
    for name in names:
        cfg = zoo_config(name)
        linears += LINEARS_BY_TYPE[cfg["model_type"]](name, cfg)
    return linears


def unique_shapes(linears: list[Linear]) -> dict[tuple[int, int], list[str]]:
    """(N, K) -> the layers of that shape, first seen first: each shape is timed once."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for lin in linears:
        shapes.setdefault((lin.n, lin.k), []).append(f"{lin.model} {lin.layer}")
    return shapes


# -- the command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, help="results file to write (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the docs tables of a saved file")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --quick")
    parser.add_argument("--quick", action="store_true",
                        help="one tiny shape and a small grid (the CPU check of this script)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo models")
    parser.add_argument("--batches", nargs="+", type=int, help=f"M values (default {BATCHES})")
    parser.add_argument("--list-linears", action="store_true",
                        help="print the models' weight shapes as JSON and exit")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds, cells skip the sweep")
    args = parser.parse_args(argv)
    if args.markdown is None and args.out is None and not args.list_linears:
        parser.error("--out is required to run the benchmark")
    if args.device == "cpu" and not args.quick:
        parser.error("the CPU runs only --quick (Triton's interpreter)")
    return args


# -- tables ------------------------------------------------------------------------------


def config_label(config: dict[str, int]) -> str:
    return (f"m{config['block_m']} n{config['block_n']} k{config['block_k']} "
            f"s{config['split_k']} w{config['num_warps']} st{config['num_stages']}")


def _fmt(cell: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    return format(cell[key] * scale, spec) if key in cell else "-"


def table_row(cell: dict[str, Any]) -> str:
    best = config_label(cell["best"]) if "best" in cell else "(none worked)"
    return (f"| {cell['n']} x {cell['k']} | {cell['m']} | {_fmt(cell, 'cublas_ms', 1e3, '.1f')} | "
            f"{_fmt(cell, 'cublas_tbps')} | {_fmt(cell, 'default_tbps')} | "
            f"{_fmt(cell, 'best_ms', 1e3, '.1f')} | {_fmt(cell, 'best_tbps')} | "
            f"{_fmt(cell, 'speedup')} | {best} | "
            f"{cell['num_configs'] - cell['num_failed']}/{cell['num_configs']} |")


TABLE_HEAD = [
    "| N x K | M | cuBLAS µs | cuBLAS TB/s | default TB/s | Triton µs | Triton TB/s "
    "| cuBLAS / Triton time | best config | configs ok |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
]


def conditions(result: dict[str, Any]) -> str:
    return (f"Device: {result['device']} ({result['num_sms']} SMs), torch {result['torch']}, "
            f"Triton {result['triton']}, {result['dtype']} weights and activations, no bias; "
            f"copy {result['copy_tbps']:.2f} TB/s (read + write) in the same run. Times: "
            f"{result['timing']}. TB/s = weight bytes / time.")


def print_header(result: dict[str, Any]) -> None:
    print(conditions(result))
    print("\n".join(TABLE_HEAD), flush=True)


def step_summary(result: dict[str, Any]) -> list[str]:
    """Per model and M: all its linear layers of one decode step, cuBLAS against the
    best configs (each shape's time times its count); only where every shape has both."""
    cells = {(c["n"], c["k"], c["m"]): c for c in result["cells"] if "best_ms" in c}
    lines = ["| model | M | linears per step | cuBLAS ms | Triton ms | cuBLAS / Triton |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    models = dict.fromkeys(lin["model"] for lin in result["linears"])
    batches = sorted({m for _, _, m in cells})
    for model, m in itertools.product(models, batches):
        lins = [lin for lin in result["linears"] if lin["model"] == model]
        if not all((lin["n"], lin["k"], m) in cells for lin in lins):
            continue
        cublas = sum(lin["count"] * cells[lin["n"], lin["k"], m]["cublas_ms"] for lin in lins)
        best = sum(lin["count"] * cells[lin["n"], lin["k"], m]["best_ms"] for lin in lins)
        count = sum(lin["count"] for lin in lins)
        lines.append(f"| {model} | {m} | {count} | {cublas:.3f} | {best:.3f} | "
                     f"{cublas / best:.2f} |")
    return lines if len(lines) > 2 else []


def markdown(result: dict[str, Any]) -> str:
    """The docs tables of a saved result: every cell, then whole decode steps."""
    lines = [conditions(result), "", *TABLE_HEAD]
    lines += [table_row(cell) for cell in result["cells"]]
    summary = step_summary(result)
    return "\n".join(lines + ([""] + summary if summary else []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(read_result(args.markdown)))
        return 0
    if args.list_linears:
        print(json.dumps([dataclasses.asdict(lin) for lin in model_linears(args.models)]))
        return 0
    from benchmarks import skinny_gemm_measure  # imports Triton: only measuring needs it

    skinny_gemm_measure.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
