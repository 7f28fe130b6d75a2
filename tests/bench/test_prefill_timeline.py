"""benchmarks.prefill_timeline: the trace's arithmetic (busy, idle at both ends, gaps,
kernels by name), its cells, its report, and its one-line refusals."""

from __future__ import annotations

import pytest

from benchmarks import prefill_timeline as tl
from benchmarks.prefill_timeline import Span


def event(name: str, ts: float, dur: float, cat: str = "kernel") -> dict[str, object]:
    return {"name": name, "ts": ts, "dur": dur, "cat": cat, "ph": "X"}


def test_busy_is_the_union_and_idle_is_split_at_its_ends_and_gaps() -> None:
    spans = [Span(110, 150, "gemm"), Span(140, 160, "norm"),  # overlap: busy 110-160
             Span(160, 170, "gemm"),                           # touching: still one run
             Span(200, 210, "scan"),                           # a 30 us gap: not over 30
             Span(300, 320, "gemm")]                           # a 90 us gap
    out = tl.summarize(spans, (100, 400), gap_us=30, top=2)
    assert out["wall_ms"] == pytest.approx(0.300)
    assert out["busy_ms"] == pytest.approx((60 + 10 + 20) / 1e3)
    assert out["before_first_ms"] == pytest.approx(0.010)
    assert out["after_last_ms"] == pytest.approx(0.080)
    assert out["gaps"]["count"] == 1
    assert out["gaps"]["total_ms"] == pytest.approx(0.090)
    assert out["gaps"]["largest"] == [pytest.approx([0.110, 0.090])]
    # idle = before + gaps (any length) + after
    idle = out["wall_ms"] - out["busy_ms"]
    assert idle == pytest.approx(0.010 + 0.030 + 0.090 + 0.080)
    assert out["kernel_ms"] == pytest.approx((40 + 20 + 10 + 10 + 20) / 1e3)
    assert [k[0] for k in out["kernels"]] == ["gemm", "norm"]
    assert out["kernels"][0][1:] == [pytest.approx(0.070), 3]
    assert out["other_kernels_ms"] == pytest.approx(0.010)  # scan, past the top 2


def test_kernels_are_clipped_to_the_window() -> None:
    spans = [Span(50, 120, "early"), Span(390, 450, "late"), Span(500, 600, "outside")]
    out = tl.summarize(spans, (100, 400), gap_us=0)
    assert out["busy_ms"] == pytest.approx(0.030)
    assert out["before_first_ms"] == 0 and out["after_last_ms"] == 0
    assert {k[0] for k in out["kernels"]} == {"early", "late"}


def test_no_kernel_is_all_idle_before_the_first() -> None:
    out = tl.summarize([], (0, 1000))
    assert out["busy_ms"] == 0 and out["before_first_ms"] == pytest.approx(1.0)
    assert out["after_last_ms"] == 0 and out["kernels"] == []


def test_a_window_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ValueError, match="ends before"):
        tl.summarize([], (10, 5))


def test_spans_and_window_from_a_chrome_trace() -> None:
    events = [event("b", 30, 5), event("a", 10, 5), event(tl.MARKER, 0, 100, "user_annotation"),
              event("cudaLaunchKernel", 9, 1, "cuda_runtime"), {"name": "x", "ph": "i"}]
    assert tl.kernel_spans(events) == [Span(10, 15, "a"), Span(30, 35, "b")]
    assert tl.marker_window(events) == (0, 100)
    with pytest.raises(ValueError, match="no range named"):
        tl.marker_window(events, "other")


@pytest.mark.parametrize("text", ["8x4096", "0x4096@8192", "8x4096@", "ax1@2", "8 x 4096@8192"])
def test_bad_cells_are_one_line(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tl.parse_args(["--cells", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "PROMPTSxTOKENS@STEP" in err[-1]


def test_cells_parse_and_default_to_the_prefill_benchmarks() -> None:
    from benchmarks.prefill import PREFILL_CELLS

    assert tl.parse_args(["--cells", "8x4096@16384"]).cells == [(8, 4096, 16384)]
    assert tuple(tl.parse_args([]).cells) == PREFILL_CELLS


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--top", "0"], ["--gap-us", "-1"]])
def test_bad_numbers_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tl.parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err.strip().splitlines()[-1]


def test_without_a_gpu_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tl.main(["--models", "granite-4.0-h-micro"])


def test_markdown_of_a_saved_result(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.common import write_result

    summary = tl.summarize([Span(1000, 5000, "_chunk_scan_kernel"), Span(5000, 9000, "nvjet")],
                           (0, 10000))
    cell = {"prompts": 1, "tokens": 16384, "step": 8192, "plain_s": [0.2, 0.21, 0.22], **summary}
    result = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "repeats": 3,
              "models": [{"model": "granite-4.0-h-micro", "cells": [cell]}]}
    path = write_result(tmp_path / "t.json.gz", result)
    assert tl.main(["--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| granite-4.0-h-micro | 1 x 16,384, 8,192 | 0.210 | 10.0 | 8.0 (80%) | 1.00 |" in out
    assert "| `_chunk_scan_kernel` | 4.00 | 1 | 50.0% |" in out
