"""benchmarks/engine.py's calibration collection, on the CPU: the device's idle time
reconstructed from step records, the points it writes, and the long-context summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from avmp.engine.profile import StepRecord
from avmp.sim.calibration import load_calibration
from benchmarks.common import write_result
from benchmarks.engine import (
    _long_lines,
    calibration_points,
    compare_long,
    device_busy_fraction,
    device_idle_after,
    row_shape,
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


def test_points_carry_the_longest_chunk_when_the_rows_have_it(tmp_path: Path) -> None:
    """Rows now end with the longest prefill chunk: the points carry it and a fit of
    steps splitting the same tokens over one or many chunks uses it; rows from before it
    (9 fields) give points without it, and their shapes take the even split."""

    def split_row(pieces: int, total: int) -> list[Any]:
        size = total // pieces
        pairs = pieces * size * (size + 1) // 2
        seconds = step_s(total, 0, total, pairs) + 3e-5 * size
        return [*row(total, 0, total, pairs, seconds, 0.0)[:4], pieces, seconds, seconds,
                False, 0.0, size]  # fmt: skip

    rows = [split_row(p, t) for p in (1, 2, 4, 16) for t in (2048, 8192)]
    rows += [[*r, 0] for r in short_cells()[0]["steps"] if r[0] == 0]
    points = calibration_points([{"steps": rows}])
    assert [p["longest_prefill_tokens"] for p in points[:2]] == [2048, 8192]
    path = write_result(tmp_path / "calibration.json", {"gpu": "g", "points": points})
    model = load_calibration(path)
    assert model.features[-1] == "longest_prefill_tokens"
    for r in rows:
        assert model.step_seconds(row_shape(r)) == pytest.approx(r[6], rel=1e-6)
    old = [r[:9] for r in rows]
    assert all("longest_prefill_tokens" not in p for p in calibration_points([{"steps": old}]))
    assert row_shape(old[-3]) == row_shape(rows[-3])  # a decode: 0 either way
    assert row_shape(old[0]).longest_prefill_tokens == 0
    assert model.step_seconds(row_shape(old[6])) == pytest.approx(rows[6][6], rel=1e-6)


def test_points_carry_the_longest_context_when_the_rows_have_it(tmp_path: Path) -> None:
    """Rows now end with the longest context of one request: the points carry it and a
    fit of skewed decode batches (a few long requests beside short ones) uses it; rows
    from before it (10 fields) give points without it, and shapes priced at their mean."""

    def with_longest(r: list[Any], longest_context: int) -> list[Any]:
        total = r[6] + r[8] + 8e-8 * longest_context
        return [*r[:5], total, total, False, 0.0, r[0], longest_context]

    def skewed_row(num_long: int, long_context: int, num_short: int) -> list[Any]:
        batch, context = num_long + num_short, num_long * long_context + num_short * 600
        return with_longest(row(0, batch, context, context, step_s(0, batch, context, context),
                                0.0), long_context)  # fmt: skip

    rows = [with_longest(r, max(r[0], 600 if r[1] and r[0] else r[2] // r[4]))
            for r in short_cells()[0]["steps"]]  # fmt: skip
    rows += [skewed_row(n, c, s) for n in (1, 4) for c in (10240, 34816) for s in (4, 32)]
    points = calibration_points([{"steps": rows}])
    assert points[-1]["longest_context_tokens"] == 34816
    path = write_result(tmp_path / "calibration.json", {"gpu": "g", "points": points})
    model = load_calibration(path)
    assert model.features[-1] == "longest_context_tokens"
    for r in rows:
        assert model.step_seconds(row_shape(r)) == pytest.approx(r[6], rel=1e-6)
    old = [r[:10] for r in rows]
    assert all("longest_context_tokens" not in p for p in calibration_points([{"steps": old}]))
    assert row_shape(old[-1]).longest_context_tokens == 0
    assert model.step_seconds(row_shape(old[-1])) < 0.9 * rows[-1][6]  # priced at its mean
