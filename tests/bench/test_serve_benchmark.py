"""benchmarks/serve.py: its tables from a hand-built result, and a smoke run end to end
on the CPU (a tiny model, one layout, 4 requests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from avmp.bench import loadgen
from avmp.bench.loadgen import LoadConfig, RequestRecord
from benchmarks import serve


def _entry(rate: float, tokens_per_s: float) -> dict:
    records = [
        RequestRecord(i, 10, 4, success=True, latency_s=0.4, chunk_s=[0.1, 0.2, 0.3, 0.4],
                      output_tokens=4)
        for i in range(5)
    ]  # fmt: skip
    config = LoadConfig("http://127.0.0.1:1", "m", request_rate=rate)
    return loadgen.rate_result(config, records, 20 / tokens_per_s, (50, 90, 99), None)


def test_tables_compare_served_saturation_with_generate() -> None:
    runs = [
        {"model": "m", "layout": "static", "results": [_entry(math.inf, 90.0), _entry(4, 50.0)],
         "generate": {"output_token_throughput": 100.0}},
        {"model": "m", "layout": "avmp", "results": [_entry(math.inf, 95.0)],
         "generate": {"output_token_throughput": 100.0}},
        {"model": "m", "layout": "unified", "error": "the server exited with code 1"},
    ]  # fmt: skip
    headers, rows = serve.saturation_rows(runs)
    assert rows[0] == ["m", "static", "90", "100", "0.90"]
    assert rows[1][-1] == "0.95" and rows[2][-1] == "the server exited with code 1"
    headers, rows = serve.latency_rows(runs)
    assert [(r[1], r[2]) for r in rows] == [("4", "static"), ("inf", "avmp"), ("inf", "static")]
    assert rows[0][headers.index("TTFT p50 ms")] == "100.0"
    assert rows[0][headers.index("TPOT p99 ms")] == "100.0"


@pytest.mark.slow
def test_smoke_run_serves_and_compares(tmp_path: Path, capsys) -> None:
    pytest.importorskip("avmp.engine.loop")
    out = tmp_path / "serve.json"
    code = serve.main(["--smoke", "--layouts", "avmp", "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert code == 0, printed
    (run,) = result["runs"]
    assert run["exit_code"] == 0 and run["generate"]["output_tokens"] > 0
    assert [e["request_rate"] for e in run["results"]] == ["20", "inf"]
    for entry in run["results"]:
        assert entry["summary"]["completed"] == 4 and entry["summary"]["usage_reported"]
        assert entry["summary"]["output_tokens"] == sum(r["max_tokens"] for r in entry["requests"])
    assert "served/generate" in printed and "| granite-4.0-h-micro | avmp |" in printed
