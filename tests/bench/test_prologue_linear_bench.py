"""benchmarks/prologue_linear.py on the CPU: which linears it times with which prologue,
and its table from a result."""

from __future__ import annotations

from typing import Any

from benchmarks.prologue_linear import best_tile, markdown, model_pairs


def test_pairs_are_the_linears_the_engine_fuses_at_one_row() -> None:
    pairs = {(p.model, p.layer): p for p in model_pairs(["granite-4.0-h-micro", "nemotron-h-8b"])}
    granite = pairs["granite-4.0-h-micro", "mamba out_proj"]
    assert (granite.prologue, granite.n, granite.k) == ("gated_norm", 2048, 4096)
    assert granite.group == 4096  # one norm group
    nemotron = pairs["nemotron-h-8b", "mamba out_proj"]
    assert nemotron.group == nemotron.k // 8  # eight norm groups
    assert pairs["nemotron-h-8b", "mlp down"].prologue == "relu_squared"
    assert pairs["granite-4.0-h-micro", "shared_mlp output_linear"].prologue == "silu_mul"
    assert pairs["granite-4.0-h-micro", "shared_mlp input_linear"].count == 40
    # the output projection of attention and the LM head read no norm of theirs
    assert not any(layer in ("attention o", "lm_head") for _, layer in pairs)


def _cell(model: str, unfused: float, fused: float, pdl: float, count: int,
          sweep: list[list[Any]]) -> dict[str, Any]:  # fmt: skip
    return {"model": model, "layer": "mamba in_proj", "prologue": "add_norm", "n": 1000,
            "k": 1000, "group": 1000, "count": count, "weight_bytes": 2_000_000,
            "rel_error": 0.001, "default_tile": [8, 256, 4], "cublas_us": 2.0,
            "unfused_us": unfused, "fused_us": fused, "fused_pdl_us": pdl,
            "sweep": sweep}  # fmt: skip


def test_table_ratios_best_tile_and_step_sum() -> None:
    sweep = [[8, 256, 4, 9.0], [16, 1024, 8, None, "CompilationError: out of resources"],
             [8, 1024, 4, 7.5]]  # fmt: skip
    cells = [_cell("a", 12.0, 10.0, 8.0, 10, sweep), _cell("b", 5.0, 5.0, 5.0, 3, [])]
    result = {"device": "GPU", "torch": "t", "triton": "3.6", "cells": cells}
    assert best_tile(cells[0]) == ([8, 1024, 4], 7.5) and best_tile(cells[1]) is None
    text = markdown(result)
    row = next(line for line in text.splitlines() if line.startswith("| a |"))
    # 2 MB in 2 us = 1.00 TB/s; 12/10 = 1.20x, 12/8 = 1.50x
    assert "| 2.0 (1.00) | 12.0 | 10.0 | 8.0 (0.25) | 1.20x | 1.50x | 7.5 (8/1024/4) |" in row
    assert "a 0.04 ms; b 0.00 ms." in text  # (12 - 8) us x 10 matrices
