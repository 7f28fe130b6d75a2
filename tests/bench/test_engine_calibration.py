"""benchmarks/engine.py's calibration collection, on the CPU: the device's idle time
reconstructed from step records, the points it writes, and the long-context summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from avmp.engine.profile import StepRecord
from avmp.sim.timing import load_calibration
from benchmarks.common import write_result
from benchmarks.engine import (
    _long_lines,
    calibration_points,
    compare_long,
    device_busy_fraction,
    device_idle_after,
)


def record(started: float, seconds: float, prefill: int = 0, decode: int = 1) -> StepRecord:
    return StepRecord(prefill, decode, 100, 100, max(1, decode), started, seconds, False)


def test_idle_time_is_what_the_device_waits_for_the_host() -> None:
    steps = [
        record(0.000, 0.005),  # device busy 0-5 ms
        record(0.001, 0.005),  # queued while busy: runs 5-10 ms, no idle before it
        record(0.014, 0.005),  # the host starts it at 14 ms: 4 ms idle after the second
        record(0.015, 0.002),  # queued again: runs 19-21 ms
    ]
    assert device_idle_after(steps) == pytest.approx([0.0, 0.004, 0.0, 0.0])
    assert device_idle_after([]) == []


def row(prefill: int, decode: int, context: int, pairs: int, device_s: float, idle_s: float):
    requests = decode + (prefill > 0)
    return [prefill, decode, context, pairs, requests, device_s + idle_s, device_s, False, idle_s]


def step_s(prefill: int, decode: int, context: int, pairs: int) -> float:
    """A known step time: intercept, prefill token, decode request, context token,
    eager step and prefill attention pair."""
    return 0.004 + 3e-5 * prefill + 2e-5 * decode + 1e-8 * context + 0.02 * (prefill > 0) + (
        1e-10 * (pairs - context)
    )


def chunk_row(start: int, size: int, decodes: int = 0, decode_context: int = 0) -> list[Any]:
    context = start + size + decodes * decode_context
    pairs = size * start + size * (size + 1) // 2 + decodes * decode_context
    total = step_s(size, decodes, context, pairs)
    return row(size, decodes, context, pairs, total * 0.9, total * 0.1)


def decode_row(batch: int, context: int) -> list[Any]:
    total = step_s(0, batch, batch * context, batch * context)
    return row(0, batch, batch * context, batch * context, total, 0.0)


def short_cells() -> list[dict[str, Any]]:
    rows = [chunk_row(0, n) for n in (64, 256, 512)]
    rows += [chunk_row(0, n, b, 600) for n in (128, 512) for b in (4, 32)]
    rows += [decode_row(b, c) for b in (1, 8, 64) for c in (300, 700)]
    return [{"steps": rows}]


def long_cell(budget: int) -> dict[str, Any]:
    rows = [chunk_row(s, budget) for s in range(0, 32768 + 1, budget)]
    rows += [chunk_row(s, budget, 4, 20000) for s in (budget, 16384)]
    rows += [decode_row(b, c) for b in (4, 16) for c in (8000, 30000)]
    return {
        "max_num_batched_tokens": budget,
        "prompt_tokens": [34816, 18432],
        "device_busy_fraction": device_busy_fraction(rows),
        "steps": rows,
    }


def test_points_carry_pairs_and_the_idle_time(tmp_path: Path) -> None:
    points = calibration_points([long_cell(8192)])
    first = points[0]
    assert first["num_attention_pairs"] == 8192 * 8193 // 2
    assert first["step_s"] == pytest.approx(step_s(8192, 0, 8192, 8192 * 8193 // 2))
    assert first["device_s"] == pytest.approx(0.9 * first["step_s"])
    path = write_result(tmp_path / "calibration.json", {"gpu": "g", "points": points})
    model = load_calibration(path)
    assert model.features[-1] == "num_prefill_attention_pairs"


def test_busy_fraction_counts_the_idle_time() -> None:
    rows = [row(0, 1, 10, 10, 0.003, 0.001), row(0, 1, 10, 10, 0.004, 0.0)]
    assert device_busy_fraction(rows) == pytest.approx(0.875)
    assert device_busy_fraction([]) is None


def test_long_cells_compared_in_sample_held_out_and_from_short_prompts() -> None:
    short, long = short_cells(), [long_cell(2048), long_cell(8192)]
    summary = compare_long(short, long, "g", "m")
    assert [s["max_num_batched_tokens"] for s in summary] == [2048, 8192]
    for cell in summary:
        for subset in ("all", "prefill", "decode"):
            assert cell[subset]["in_sample_error"] == pytest.approx(0.0, abs=1e-6)
            assert cell[subset]["held_out_error"] == pytest.approx(0.0, abs=1e-6)
    lines = _long_lines({"long_cells": long, "long_vs_predicted": summary})
    assert any("2048 tokens per step" in line for line in lines)
    assert any("short-prompt cells only" in line for line in lines)
