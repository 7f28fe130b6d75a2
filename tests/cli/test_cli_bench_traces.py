"""``avmp bench --trace FILE``: trace files as workloads beside the presets, resumed,
refused when changed, and named in the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from avmp.bench.sweep import trace_digest
from avmp.bench.traces import read_trace
from avmp.cli import main
from cli_helpers import one_line_error
from trace_helpers import write_chat_jsonl, write_conversation_jsonl, write_lengths_csv

GRID = ["--quick", "--models", "granite-4.0-h-tiny", "--budgets", "1GiB", "--seeds", "2",
        "--workers", "1", "--no-progress"]


@pytest.fixture
def traces(tmp_path: Path) -> tuple[Path, Path]:
    return write_chat_jsonl(tmp_path / "chat.jsonl"), write_lengths_csv(tmp_path / "lens.csv")


def _cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def test_traces_beside_a_preset_run_resume_and_report(
    tmp_path: Path, traces: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 6)
    chat, lens = traces
    out = tmp_path / "out"
    args = ["bench", "--out", str(out), *GRID, "--workloads", "shift",
            "--trace", str(chat), "--trace", str(lens)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"trace chat: 6 requests from {chat} (jsonl)\n"
                              f"trace lens: 5 requests from {lens} (csv); read as CSV: ")
    assert "| chat | static | 1 |" in printed and "| lens | static | 1 |" in printed
    assert "| shift | static | 2 |" in printed
    assert "24 cells (24 simulated now" in printed  # (2 seeds of shift + 2 traces) x 6 layouts
    cells = _cells(out)
    chat_cells = [c for c in cells.values() if c["cell"]["workload"] == "chat"]
    assert len(chat_cells) == 6 and {c["cell"]["seed"] for c in chat_cells} == {0}
    assert {c["settings"]["trace_sha256"] for c in chat_cells} == {trace_digest(read_trace(chat))}
    assert chat_cells[0]["trace"]["source"] == {
        "file": str(chat), "format": "jsonl", "num_file_requests": 6}
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert [t["name"] for t in run["traces"]] == ["chat", "lens"]

    report = (out / "report.md").read_text()
    assert "- workloads: chat, lens, shift" in report
    assert "- requests per trace: chat 6, lens 5, shift 6" in report
    assert f"- trace lens: 5 requests from {lens} (csv), digest " in report
    assert "replayed as recorded (seed 0)" in report and "trace_sha256" not in report
    assert f"trace chat: 6 requests from {chat} (jsonl)" in (out / "report.html").read_text()

    assert main(args) == 0  # resumes
    assert "24 cells (0 simulated now" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    redrawn = capsys.readouterr().out
    assert "| chat | unified | 1 |" in redrawn
    assert f"trace chat: 6 requests from {chat} (jsonl), digest " in redrawn

    write_chat_jsonl(chat, output_tokens=9)  # the same file, other requests
    assert main(args) == 2
    error = one_line_error(capsys, "bench")
    assert "made with other trace_sha256" in error
    assert "the requests of the trace chat changed since" in error


def test_a_trace_alone_takes_its_first_requests(
    tmp_path: Path, traces: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 4)
    chat, _ = traces
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *GRID, "--trace", str(chat)]) == 0
    assert "6 cells (6 simulated now" in capsys.readouterr().out  # no preset: the trace alone
    assert {c["settings"]["num_requests"] for c in _cells(out).values()} == {4}  # --quick
    assert main(["bench", "--out", str(tmp_path / "three"), *GRID, "--trace", str(chat),
                 "--max-requests", "3"]) == 0
    assert capsys.readouterr().out.startswith(
        f"trace chat: 3 requests (the first 3 of 6) from {chat} (jsonl)\n")
    report = (tmp_path / "three" / "report.md").read_text()
    assert f"trace chat: 3 requests (the first 3 of 6) from {chat} (jsonl)" in report


def test_arrival_retimes_a_trace_per_seed(
    tmp_path: Path, traces: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    _, lens = traces
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *GRID, "--trace", str(lens),
                 "--arrival", "poisson:4"]) == 0
    assert "12 cells (12 simulated now" in capsys.readouterr().out
    avmp = {c["cell"]["seed"]: c for c in _cells(out).values() if c["cell"]["allocator"] == "avmp"}
    assert sorted(avmp) == [0, 1]
    assert avmp[0]["trace"]["sha256"] != avmp[1]["trace"]["sha256"]  # each seed's times
    assert avmp[0]["settings"] == avmp[1]["settings"]  # the same requests read
    assert "replayed re-timed by poisson:4 per seed" in (out / "report.md").read_text()


def test_prefix_cache_gets_the_sharing_a_trace_names(
    tmp_path: Path, traces: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    chat, lens = traces
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *GRID, "--trace", str(chat), "--trace", str(lens),
                 "--prefix-cache", "avmp"]) == 0
    printed = capsys.readouterr().out
    assert "its prompts name no shared content" in printed.splitlines()[1]  # lens, a CSV
    assert "no shared content" not in printed.splitlines()[0]
    hits = {c["cell"]["workload"]: c["result"]["prefix"]["num_hit_tokens"]
            for c in _cells(out).values() if c["cell"]["allocator"] == "avmp"}
    assert hits["chat"] > 0 and hits["lens"] == 0


def _preset_named(tmp_path: Path) -> list[str]:
    return ["--trace", str(write_lengths_csv(tmp_path / "shift.csv"))]


def _twice_named(tmp_path: Path) -> list[str]:
    (tmp_path / "b").mkdir()
    return ["--trace", str(write_lengths_csv(tmp_path / "a.csv")),
            "--trace", str(write_chat_jsonl(tmp_path / "b" / "a.jsonl"))]


def _bad_line(tmp_path: Path) -> list[str]:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1}\n{"arrival_s": \n')
    return ["--trace", str(path)]


def _turns_retimed(tmp_path: Path) -> list[str]:
    return ["--trace", str(write_conversation_jsonl(tmp_path / "talk.jsonl")),
            "--arrival", "poisson:2"]


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda d: ["--trace", str(d / "missing.csv")], "missing.csv: no such file"),
    (lambda d: ["--trace", str(d)], "is a directory, not a trace file"),
    (_preset_named, "'shift' is the preset shift's name; rename the file"),
    (_twice_named, "would both be the workload 'a'"),
    (lambda d: ["--trace", str(write_lengths_csv(d / "t.csv"))] * 2, "is given twice"),
    (lambda d: ["--max-requests", "5"], "--max-requests says how to read --trace files"),
    (lambda d: ["--time-unit", "ms"], "--time-unit says how to read --trace files"),
    (lambda d: ["--trace", str(write_lengths_csv(d / "t.csv")), "--max-requests", "0"],
     "--max-requests must be a whole number >= 1, got '0'"),
    (lambda d: ["--trace", str(write_lengths_csv(d / "t.csv")), "--trace-format", "jsonl"],
     "t.csv:1"),
    (_bad_line, "bad.jsonl:2"),
    (_turns_retimed, "--arrival cannot re-time the trace"),
])
def test_bad_traces_are_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make_args: Callable[[Path], list[str]], message: str,
) -> None:
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *GRID, *make_args(tmp_path)]) == 2
    assert message in one_line_error(capsys, "bench")
    assert not out.exists()


def test_bench_serve_keeps_its_own_trace_option(tmp_path: Path) -> None:
    from avmp.cli import build_parser

    lens = write_lengths_csv(tmp_path / "lens.csv")
    serve = build_parser().parse_args(["bench", "serve", "--url", "http://x", "--trace", str(lens)])
    assert serve.trace == str(lens)
    bench = build_parser().parse_args(["bench", "--trace", str(lens), "--trace", "b.csv"])
    assert bench.trace == [str(lens), "b.csv"] and bench.bench_command is None


def test_skipped_infeasible_cells_count_a_trace_once(
    tmp_path: Path, traces: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 4)
    _, lens = traces
    # Granite-4.0-H-Tiny's weights do not fit in the RTX 3060's 12 GB
    assert main(["bench", "--out", str(tmp_path / "out"), *GRID, "--profiles", "rtx3060,h200",
                 "--workloads", "shift", "--trace", str(lens)]) == 0
    printed = capsys.readouterr().out
    assert "18 cells (18 simulated now" in printed  # (2 seeds of shift + 1 trace) x 6 layouts
    assert "skipped 18 infeasible cells (1 model/budget/profile combinations: " \
           "granite-4.0-h-tiny 1.0 GiB rtx3060)" in printed
