"""Decode attention's launch tiles on a CUDA GPU: tokens per loop step (``BLOCK_N``),
warps, pipeline stages and context splits, timed in CUDA graphs against the bytes of K
and V a decode step must read.

The step: 64 requests of one query token each, a page-major pool of 16-token pages in
shuffled order holding four layers' K and V (the engine's views: a page's stride is the
whole page), 32 query heads over 8 KV heads, head dim 64 (Granite-4.0-H-Micro) or 128
(Nemotron-H-8B, ``--head-dims 128``), at each of ``--contexts`` cached tokens. Each
candidate is a call of `avmp.kernels.triton.decode_attention` with its tiles given
(``block_n``, ``num_warps``, ``num_stages``, ``num_splits``); its output is compared with
the package default's.

    PYTHONPATH=src python3 -m benchmarks.decode_attention_tiles --out $OUT/tiles.json.gz
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import graph_us, write_result

BATCH, QUERY_HEADS, KV_HEADS, PAGE_TOKENS, LAYERS = 64, 32, 8, 16, 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("decode_attention_tiles: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for head_dim, context in itertools.product(args.head_dims, args.contexts):
        rows += sweep(args, head_dim, context)
    if args.out:
        write_result(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


def sweep(args: argparse.Namespace, head_dim: int, context: int) -> list[dict[str, float]]:
    import torch
    import triton

    from avmp.kernels.triton.decode_attention import decode_attention
    dev = torch.device("cuda")
    pages = triton.cdiv(context, PAGE_TOKENS)
    pool = torch.randn(BATCH * pages + 8, PAGE_TOKENS, LAYERS, 2, KV_HEADS, head_dim,
                       device=dev, dtype=torch.bfloat16)  # fmt: skip
    k, v = pool[:, :, 2, 0], pool[:, :, 2, 1]  # one layer's K and V, strided as the engine's
    tables = torch.randperm(BATCH * pages, device=dev).to(torch.int32).view(BATCH, pages)
    lens = torch.full((BATCH,), context, device=dev, dtype=torch.int32)
    q = torch.randn(BATCH, QUERY_HEADS, head_dim, device=dev, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    default = decode_attention(q, k, v, tables, lens, scale)
    kv_bytes = 2 * BATCH * context * KV_HEADS * head_dim * 2
    out = torch.empty_like(q)
    base_us = timed(lambda: decode_attention(q, k, v, tables, lens, scale, out=out))
    print(f"head dim {head_dim}, {context} cached tokens: package default {base_us:.1f} us "
          f"({kv_bytes / base_us / 1e3:.0f} GB/s of K and V)", flush=True)  # fmt: skip
    rows = [{"head_dim": head_dim, "context": context, "config": "default", "us": base_us,
             "gb_per_s": kv_bytes / base_us / 1e3, "max_diff": 0.0}]  # fmt: skip
    candidates = itertools.product(args.block_n, args.warps, args.stages, args.splits)
    for block_n, warps, stages, splits in candidates:
        tiles = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            us = timed(lambda tiles=tiles: decode_attention(q, k, v, tables, lens, scale,
                                                               out=out, **tiles))  # fmt: skip
        except Exception as exc:  # a candidate that cannot compile or launch is skipped
            print(f"  BLOCK_N {block_n} w{warps} s{stages} split {splits}: {exc}"[:160])
            continue
        rows.append({"head_dim": head_dim, "context": context,
                     "config": f"BLOCK_N {block_n} w{warps} s{stages} split {splits}",
                     "us": us, "gb_per_s": kv_bytes / us / 1e3,
                     "max_diff": (out.float() - default.float()).abs().max().item()})  # fmt: skip
    for row in sorted(rows, key=lambda r: r["us"])[:8]:
        print(f"  {row['config']}: {row['us']:.1f} us, {row['gb_per_s']:.0f} GB/s, "
              f"max diff {row['max_diff']:.1e}", flush=True)  # fmt: skip
    return rows


def timed(fn: Any) -> float:
    """Median µs per call of ``fn``, 20 calls replayed in one CUDA graph."""
    return graph_us(lambda i: fn(), 20, 5)


if __name__ == "__main__":
    raise SystemExit(main())
