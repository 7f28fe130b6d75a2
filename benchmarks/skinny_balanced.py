"""Decode GEMMs whose tiles overrun a wave, on a CUDA GPU: `decode_config`'s launch (one
program per 64-row tile), the same tiles with a deeper pipeline where K is whole
(`deep_stages`: one program per SM fits), and `balanced_config`'s launch where it takes
the shape (one program per SM, each streaming an equal run of all tiles' K steps, the
tiles it shares summed by the last).

Shapes: every decode linear of Granite-4.0-H-Micro and Nemotron-H-8B at 64 tokens
(``benchmarks.skinny_gemm.model_linears``; Granite's in_proj is 133 tiles on an H100's
132 SMs), plus ``--control`` shapes (8,448 x 2,048: 132 tiles, one whole wave). Each
launch runs as the engine launches it (dependent launch, 512 bytes of each weight row
asked of L2 early), its calls over distinct weights (about 1.5 GB, L2 never holds them)
captured in one CUDA graph (`benchmarks.common.graph_us`); each output is compared with
``F.linear``. TB/s = weight bytes / time.

    PYTHONPATH=src python3 -m benchmarks.skinny_balanced --out $OUT/balanced.json.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import graph_us, rel_error, write_result
from benchmarks.skinny_gemm import model_linears

MODELS = ("granite-4.0-h-micro", "nemotron-h-8b")
WEIGHT_BYTES = 1500 << 20  # weights cycled through per graph, beyond any L2
PREFETCH_BYTES = 512


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--control", type=int, nargs=2, action="append", metavar=("N", "K"),
                        help="extra N K shapes (default: 8448 2048)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results file (.json.gz: compressed)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("skinny_balanced: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes: dict[tuple[int, int], str] = {}
    for linear in model_linears(args.models):
        shapes.setdefault((linear.n, linear.k), f"{linear.model} {linear.layer}")
    for n, k in args.control or [(8448, 2048)]:
        shapes.setdefault((n, k), "control")
    rows = [measure(n, k, args.batch, label) for (n, k), label in shapes.items()]
    if args.out:
        write_result(args.out, {"device": torch.cuda.get_device_name(), "batch": args.batch,
                                "rows": rows})  # fmt: skip
    return 0


def measure(n: int, k: int, m: int, label: str) -> dict[str, Any]:
    """The launches of one ``[n, k]`` weight at ``m`` tokens (µs per call, TB/s)."""
    import torch

    from avmp.kernels.triton import skinny_linear as sk

    dev = torch.device("cuda")
    sms = sk.num_sms(dev)
    copies = max(2, min(36, WEIGHT_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, weights[0])
    counters = torch.zeros(1 << 14, dtype=torch.int32, device=dev)
    decode = sk.decode_config(m, n, k, sms)
    balanced = sk.balanced_config(m, n, k, sms)
    launches = {"decode": decode}
    if decode.split_k == 1:
        launches["deeper"] = dataclasses.replace(decode, num_stages=sk.deep_stages(decode))
    if balanced is not None:
        launches["balanced"] = balanced
    row: dict[str, Any] = {"layer": label, "n": n, "k": k, "tiles": sk.tiles(m, n, decode),
                           "sms": sms}  # fmt: skip
    for name, config in launches.items():

        def call(i: int, config: sk.SkinnyConfig = config) -> torch.Tensor:
            return sk.skinny_linear(x, weights[i % copies], None, config, pdl=True,
                                    prefetch_bytes=PREFETCH_BYTES, counters=counters)  # fmt: skip

        error = rel_error(call(0), ref)
        us = graph_us(call, copies)
        row[name] = {"config": config.to_dict(), "us": us, "tb_s": n * k * 2 / us / 1e6,
                     "rel_error": error}  # fmt: skip
    cells = "  ".join(f"{name} {row[name]['us']:.2f} us ({row[name]['tb_s']:.2f} TB/s)"
                      for name in launches)  # fmt: skip
    print(f"{label} [{n} x {k}], {row['tiles']} tiles: {cells}", flush=True)
    weights.clear()
    torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    sys.exit(main())
