"""Split-K decode GEMMs whose sums the next norm makes, on a CUDA GPU: `decode_config`'s
tiling against other splits and tiles, each timed as the engine runs a block's last
linear at a decode batch: the GEMM's fp32 parts (`skinny_parts`) and then the fused
add-and-norm that sums them into the residual stream (`add_rms_norm`), both dependent
launches, the GEMM asking L2 for 512 bytes of each weight row before its wait.

Why: at 64 rows Granite-4.0-H-Micro's 2,048-row out_proj and down projections (K split
four ways, 128 programs) stream 1.5-1.9 TB/s where its wide GEMMs reach 2.8
(docs/BENCHMARKS.md, session 24): about 0.5 ms of a 5.2 ms step. More parts fill the SMs
twice over but re-read the batch's activations and give the norm more to sum; wider
tiles read the activations fewer times but leave fewer programs. This times the pair, so
both costs count.

Shapes: every linear of the named models as the engine runs them (`engine_linears`: q,
k and v as one) that `decode_config` splits at ``--batch`` rows. Candidates
(`candidates`): splits 2-16, 32 to 128-row tiles, K steps of 64-256, 3-6 stages, within
``SHARED_BYTES`` of shared memory, at least two K steps a part and at most
``MAX_PROGRAMS_PER_SM`` programs per SM; `decode_config`'s own first. Each pair runs
over distinct weights (about 1.5 GB, never in L2), ``calls`` pairs captured in one CUDA
graph (`benchmarks.common.graph_us`); each candidate's parts, summed, are compared with
``F.linear`` and skipped when wrong or failing to compile. TB/s = weight bytes / time
of the pair.

    PYTHONPATH=src python3 -m benchmarks.skinny_split --out $OUT/skinny_split.json.gz
    python3 -m benchmarks.skinny_split --markdown benchmarks/results/FILE
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import read_result, write_result
from benchmarks.skinny_balanced import MODELS, WEIGHT_BYTES
from benchmarks.skinny_gemm import Linear, model_linears, unique_shapes

SHARED_BYTES = 200 << 10  # one program's staged tiles (H100: 227 KiB per SM)
SPLITS = (2, 4, 8, 16)
BLOCK_N = (32, 64, 128)
BLOCK_K = (64, 128, 256)
STAGES = (3, 4, 6)
MAX_PROGRAMS_PER_SM = 4
EPS = 1e-5


def candidates(m: int, n: int, k: int, num_sms: int) -> list[Any]:
    """The tilings timed for one ``[n, k]`` weight at ``m`` rows: `decode_config`'s first,
    then every split, tile and pipeline depth of the grid whose stages fit
    ``SHARED_BYTES``, whose parts keep two K steps at least, and whose programs stay
    within ``MAX_PROGRAMS_PER_SM`` per SM."""
    from avmp.kernels.triton import skinny_linear as sk

    decode = sk.decode_config(m, n, k, num_sms)
    block_m = sk.default_block_m(m)
    found = [decode]
    for split, block_n, block_k, stages in itertools.product(SPLITS, BLOCK_N, BLOCK_K, STAGES):
        config = sk.SkinnyConfig(block_m, block_n, block_k, split, 4, stages, tma=True)
        stage_bytes = (block_m + block_n) * block_k * 2
        if (
            config != decode
            and stages * stage_bytes <= SHARED_BYTES
            and -(-k // block_k) >= 2 * split
            and sk.tiles(m, n, config) * split <= MAX_PROGRAMS_PER_SM * num_sms
        ):
            found.append(config)
    return found


def engine_linears(models: list[str]) -> list[Linear]:
    """The models' decode linears as the engine runs them: an attention layer's q, k
    and v projections as one stacked linear (`StackedLinears`)."""
    linears = model_linears(models)
    out = [lin for lin in linears if lin.layer not in ("attention q", "attention k, v")]
    for model in models:
        q = [lin for lin in linears if lin.model == model and lin.layer == "attention q"]
        kv = [lin for lin in linears if lin.model == model and lin.layer == "attention k, v"]
        if q and kv:
            out.append(replace(q[0], layer="attention q, k, v", n=q[0].n + 2 * kv[0].n))
    return out


def split_linears(models: list[str], m: int, num_sms: int) -> dict[tuple[int, int], list[str]]:
    """(N, K) -> layer names, of the models' linears (`engine_linears`) that
    `decode_config` splits."""
    from avmp.kernels.triton import skinny_linear as sk

    shapes = unique_shapes(engine_linears(models))
    return {
        (n, k): layers
        for (n, k), layers in shapes.items()
        if sk.splits_k(k, sk.decode_config(m, n, k, num_sms))
    }


def measure(n: int, k: int, m: int, layers: list[str]) -> dict[str, Any]:
    """Every candidate's pair time for one ``[n, k]`` weight at ``m`` rows."""
    import torch

    from avmp.engine.triton_ops import SKINNY_PREFETCH_BYTES
    from avmp.kernels.triton import rms_norm
    from avmp.kernels.triton import skinny_linear as sk
    from benchmarks.common import graph_us, rel_error

    dev = torch.device("cuda")
    sms = sk.num_sms(dev)
    copies = max(2, min(36, WEIGHT_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    stream = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    norm_weight = torch.ones(n, device=dev, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, weights[0]).float()
    rows: list[dict[str, Any]] = []
    for config in candidates(m, n, k, sms):

        def pair(i: int, config: sk.SkinnyConfig = config) -> torch.Tensor:
            parts = sk.skinny_parts(x, weights[i % copies], None, config, pdl=True,
                                    prefetch_bytes=SKINNY_PREFETCH_BYTES)  # fmt: skip
            return rms_norm.add_rms_norm(stream, parts, norm_weight, EPS, pdl=True)[1]

        entry: dict[str, Any] = {"config": config.to_dict()}
        try:
            parts = sk.skinny_parts(x, weights[0], None, config)
            entry["rel_error"] = rel_error(parts.total().float(), ref)
            if entry["rel_error"] > 1e-2:
                entry["skipped"] = "wrong"
            else:
                entry["us"] = graph_us(pair, copies)
                entry["tb_s"] = n * k * 2 / entry["us"] / 1e6
        except Exception as error:  # a tiling that fails to compile or launch: recorded
            entry["skipped"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(entry)
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    result = {"n": n, "k": k, "layers": layers, "sms": sms, "decode": rows[0], "best": best,
              "candidates": rows}  # fmt: skip
    decode_us = rows[0].get("us")
    if best is not None and decode_us is not None:
        print(f"{layers[0]} [{n} x {k}]: decode_config {decode_us:.2f} us, best "
              f"{best['us']:.2f} us ({_label(best['config'])}), {len(timed)} timed",
              flush=True)  # fmt: skip
    weights.clear()
    torch.cuda.empty_cache()
    return result


def tuned_configs(result: dict[str, Any]) -> dict[tuple[int, int, int], Any]:
    """(rows, N, K) -> the fastest tiling of each shape of a saved result where it beats
    `decode_config`'s (`TritonOps.decode_configs`, the engine benchmark's
    ``--skinny-tuned``)."""
    from avmp.kernels.triton.skinny_linear import SkinnyConfig

    tuned = {}
    for row in result["rows"]:
        best, decode = row["best"], row["decode"]
        if best is not None and "us" in decode and best["us"] < decode["us"]:
            tuned[(result["batch"], row["n"], row["k"])] = SkinnyConfig(**best["config"])
    return tuned


def _label(config: dict[str, Any]) -> str:
    return (f"n{config['block_n']} k{config['block_k']} s{config['split_k']} "
            f"st{config['num_stages']}")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The docs table of a saved result: per shape, `decode_config`'s pair against the
    fastest candidate's."""
    lines = [
        f"Device: {result['device']}; batch {result['batch']}; a split GEMM's parts and the "
        "add-and-norm that sums them, µs per pair (weight TB/s).",
        "",
        "| linear | N x K | decode_config | µs (TB/s) | fastest | µs (TB/s) | decode / fastest |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        decode, best = row["decode"], row["best"]
        if best is None or "us" not in decode:
            lines.append(f"| {row['layers'][0]} | {row['n']} x {row['k']} | not timed | | | | |")
            continue
        lines.append(
            f"| {row['layers'][0]} | {row['n']} x {row['k']} | {_label(decode['config'])} | "
            f"{decode['us']:.2f} ({decode['tb_s']:.2f}) | {_label(best['config'])} | "
            f"{best['us']:.2f} ({best['tb_s']:.2f}) | {decode['us'] / best['us']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    parser.add_argument("--markdown", type=Path, help="print the table of a saved result")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        try:
            print(markdown(read_result(args.markdown)))
        except (OSError, ValueError, KeyError) as error:
            print(f"skinny_split: cannot read {args.markdown}: {error}", file=sys.stderr)
            return 2
        return 0
    import torch

    if not torch.cuda.is_available():
        print("skinny_split: needs a CUDA GPU", file=sys.stderr)
        return 2
    from avmp.kernels.triton import skinny_linear as sk

    sms = sk.num_sms(torch.device("cuda"))
    shapes = split_linears(args.models, args.batch, sms)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "batch": args.batch,
                              "rows": []}  # fmt: skip
    for (n, k), layers in shapes.items():
        result["rows"].append(measure(n, k, args.batch, layers))
        if args.out:  # after every shape: a run cut short keeps what it measured
            write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
