from __future__ import annotations

import math
from pathlib import Path

import pytest

from avmp.bench import loadgen, serve_report
from avmp.bench.loadgen import Goodput, LoadConfig, RequestRecord
from avmp.cli import main


def _record(index: int, ttft: float, gap: float, tokens: int) -> RequestRecord:
    chunks = [ttft + i * gap for i in range(tokens)]
    return RequestRecord(
        index,
        20,
        tokens,
        start_s=0.1 * index,
        success=True,
        latency_s=chunks[-1] + 0.001,
        chunk_s=chunks,
        output_tokens=tokens,
        usage_reported=True,
    )


def _result(tmp_path: Path) -> Path:
    """A result of two rates, the second slower, with one failed request."""
    entries = []
    for rate, scale in ((2.0, 1.0), (math.inf, 3.0)):
        records = [_record(i, 0.05 * scale * (1 + i), 0.01 * scale, 8) for i in range(6)]
        records.append(RequestRecord(6, 20, 8, error="HTTP 503: busy"))
        config = LoadConfig("http://127.0.0.1:1", "m", request_rate=rate, max_concurrency=4)
        entries.append(loadgen.rate_result(config, records, 3.0, (50, 99), Goodput(ttft_ms=200)))
    result = {
        "schema": loadgen.RESULT_SCHEMA,
        "argv": ["avmp", "bench", "serve"],
        "url": "http://127.0.0.1:1",
        "model": "m",
        "date": "2026-12-01T00:00:00+00:00",
        "settings": {"endpoint": "completions", "dataset": "workload shift", "num_prompts": 7},
        "results": entries,
    }
    path = tmp_path / "run.json"
    loadgen.save_result(path, result)
    return path


def test_tables_hold_each_rate_and_metric(tmp_path: Path) -> None:
    result = loadgen.load_result(_result(tmp_path))
    headers, rows = serve_report.throughput_table(result)
    assert [row[:3] for row in rows] == [["2/s cap 4", "6", "1"], ["inf cap 4", "6", "1"]]
    assert rows[0][headers.index("goodput/s")] == "1.33"  # 4 of 6 under 200 ms, over 3 s
    headers, rows = serve_report.latency_table(result)
    assert headers == ["load", "metric", "mean ms", "median ms", "p99 ms"]
    assert [row[1] for row in rows[:4]] == ["TTFT", "TPOT", "ITL", "E2E"] and len(rows) == 8
    assert rows[0][3] == "175.00" and rows[4][3] == "525.00"  # median TTFT x3 at inf
    text = serve_report.markdown_table(serve_report.latency_table(result))
    assert text.splitlines()[0] == "| load | metric | mean ms | median ms | p99 ms |"


def test_latency_report_writes_png_and_html_beside_the_json(tmp_path: Path) -> None:
    png_path, html_path = serve_report.write_latency_report(_result(tmp_path))
    assert png_path == tmp_path / "run.latency.png" and html_path == tmp_path / "run.html"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "inf cap 4" in page and "HTTP 503" not in page
    assert "workload shift" in page and page.count("<table>") == 2


def test_avmp_report_on_a_serve_result(tmp_path: Path, capsys) -> None:
    path = _result(tmp_path)
    assert main(["report", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "1 x HTTP 503: busy" in printed
    assert (tmp_path / "run.latency.png").exists() and (tmp_path / "run.html").exists()


def test_avmp_report_on_a_foreign_json_is_one_line(tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    assert main(["report", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not an avmp bench serve result" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", ["{", "\udcff"])
def test_unreadable_result_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match="bad.json: not"):
        loadgen.load_result(path)


def _turn(conversation: int, turn: int, ttft: float, success: bool = True) -> RequestRecord:
    record = _record(2 * conversation + turn, ttft, 0.01, 4)
    record.prompt_tokens = 20 + 30 * turn
    record.conversation, record.turn, record.conversation_turns = conversation, turn, 2
    if not success:
        record.success, record.error, record.chunk_s = False, "HTTP 500: x", []
    return record


def _multi_turn_result(tmp_path: Path) -> Path:
    """Three conversations of two turns, later turns faster; the last one's second failed."""
    records = [_turn(c, 0, 0.2) for c in range(3)]
    records += [_turn(0, 1, 0.04), _turn(1, 1, 0.06), _turn(2, 1, 0.05, success=False)]
    config = LoadConfig("http://127.0.0.1:1", "m", endpoint="chat", max_concurrency=2)
    entry = loadgen.rate_result(config, records, 2.0, (50, 99), None)
    result = {
        "schema": loadgen.RESULT_SCHEMA,
        "url": "http://127.0.0.1:1",
        "model": "m",
        "settings": {"endpoint": "chat", "dataset": "ShareGPT conversations", "num_prompts": 3,
                     "multi_turn": {"turns": [6], "num_turns": 2, "think_time_s": 0.5}},
        "results": [entry],
    }  # fmt: skip
    path = tmp_path / "mt.json"
    loadgen.save_result(path, result)
    return path


def test_conversations_add_ttft_by_turn(tmp_path: Path, capsys) -> None:
    path = _multi_turn_result(tmp_path)
    result = loadgen.load_result(path)
    turns = result["results"][0]["summary"]["turns"]
    assert turns["conversations"] == 3 and turns["conversations_completed"] == 2
    headers, rows = serve_report.turn_table(result)
    assert headers == ["load", "turn", "done", "failed", "prompt tok", "TTFT mean ms",
                       "median ms", "p99 ms"]  # fmt: skip
    assert [row[:5] for row in rows] == [
        ["inf cap 2", "1", "3", "0", "20.0"],
        ["inf cap 2", "2", "2", "1", "50.0"],
        ["inf cap 2", "2+", "2", "1", ""],
    ]
    assert rows[0][6] == "200.00" and rows[1][6] == "50.00" and rows[2][5] == "50.00"
    assert "3 conversations (6 turns) per rate, think time 0.5 s" in serve_report.conditions(result)
    png_path, html_path = serve_report.write_latency_report(path)
    page = html_path.read_text()
    assert page.count("<table>") == 3 and "TTFT by turn" in page
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(path)]) == 0
    assert "TTFT by turn" in capsys.readouterr().out


def test_single_turn_results_have_no_turn_table(tmp_path: Path) -> None:
    result = loadgen.load_result(_result(tmp_path))
    assert not serve_report.is_multi_turn(result)
    assert serve_report.turn_table(result)[1] == []
    # a result saved before conversations existed reads the same
    del result["results"][0]["summary"]["turns"]
    assert not serve_report.is_multi_turn(result) and "requests per rate" in (
        serve_report.conditions(result)
    )


def _labelled_ticks(ax) -> list[str]:
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    return [t.label1.get_text() for t in ticks if t.label1.get_text() and lo <= t.get_loc() <= hi]


def test_latency_cdfs_within_two_decades_have_numbered_axes(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [_record(i, 1.5 + 0.2 * i, 0.05, 8) for i in range(6)]  # TTFT 1.5-2.5 s
    config = LoadConfig("http://127.0.0.1:1", "m", request_rate=math.inf)
    result = {"results": [loadgen.rate_result(config, records, 3.0, (50,), Goodput())]}
    fig, ax = plt.subplots()
    serve_report._draw_cdf(ax, result, "ttft")
    assert len(_labelled_ticks(ax)) >= 2, "a reader needs two numbers to read the axis"
    plt.close(fig)
