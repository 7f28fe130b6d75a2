"""`avmp replay` and `avmp bench serve --trace` on traces in shapes we did not write: the
header says which columns were read and in which unit; ``--time-unit`` sets the unit of a
bare time; what cannot be read is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from fake_openai_server import FakeBehaviour, fake_server  # noqa: E402

REPLAY = ["--model", "granite-4.0-h-micro", "--memory", "1GiB", "--allocators", "avmp",
          "--no-progress"]  # fmt: skip


def _csv(path: Path, header: str, scale: float) -> Path:
    """The `shift` workload's first 12 requests as a CSV, times multiplied by ``scale``."""
    requests = make_workload("shift", 0, num_requests=12)
    rows = [f"{r.arrival_s * scale!r},{r.prompt_tokens},{r.output_tokens}" for r in requests]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _header(out: str) -> str:
    return out.splitlines()[0]


def test_a_generic_csv_replays_as_our_jsonl_and_says_how_it_was_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = tmp_path / "ours.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=12), ours)
    assert main(["replay", str(ours), *REPLAY]) == 0
    jsonl_out = capsys.readouterr().out
    assert "read as" not in _header(jsonl_out)  # a known format's header is as it was
    generic = _csv(tmp_path / "t.csv", "Timestamp_ms,Input Tokens,completion_tokens", 1000)
    assert main(["replay", str(generic), *REPLAY]) == 0
    out = capsys.readouterr().out
    assert _header(out).endswith(
        "; read as CSV: arrival time from 'Timestamp_ms' in milliseconds (as its name says), "
        "prompt tokens from 'Input Tokens', output tokens from 'completion_tokens'"
    )
    assert out.splitlines()[1:] == jsonl_out.splitlines()[1:]  # the same requests replayed


def test_time_unit_sets_a_bare_times_unit_and_json_keeps_stdout_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seconds = _csv(tmp_path / "s.csv", "time,prompt_tokens,output_tokens", 1)
    micros = _csv(tmp_path / "us.csv", "time,prompt_tokens,output_tokens", 1e6)
    assert main(["replay", str(seconds), *REPLAY, "--json"]) == 0
    by_default = capsys.readouterr()
    assert main(["replay", str(micros), *REPLAY, "--json", "--time-unit", "us"]) == 0
    in_us = capsys.readouterr()
    assert by_default.err.strip() == (
        f"{seconds}: read as CSV: arrival time from 'time' in seconds (the default where a "
        "name gives no unit; --time-unit to change it), prompt tokens from 'prompt_tokens', "
        "output tokens from 'output_tokens'"
    )
    assert "in microseconds (--time-unit)" in in_us.err
    first, second = json.loads(by_default.out)[0], json.loads(in_us.out)[0]
    assert first["completed_requests"] == second["completed_requests"]


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("timestamp_ms,input_len,output_len\n1,2,3\n", ["--time-unit", "s"],
         "t.csv:1: column 'timestamp_ms' gives its times in milliseconds"),
        ("when,size\n1,2\n", [], "t.csv:1: cannot tell the trace format from its header"),
        ("ts,input_len\n1,2\n", ["--format", "csv"], "t.csv:1: missing column 'output_tokens'"),
    ],
)  # fmt: skip
def test_a_trace_that_cannot_be_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, args: list[str], message: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    assert main(["replay", str(path), *REPLAY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    with fake_server(FakeBehaviour(first_token_s=0.005, token_gap_s=0.0005)) as running:
        yield running


def test_bench_serve_names_how_a_generic_trace_was_read(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = server
    trace = tmp_path / "lengths.json"
    trace.write_text(json.dumps([{"input_len": 5 + i, "output_len": 2} for i in range(3)]))
    base = ["bench", "serve", "--url", url, "--trace", str(trace), "--warmup", "0",
            "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(base) == 0
    assert sorted(len(b["prompt"]) for b in state.bodies[before:]) == [5, 6, 7]
    out = " ".join(capsys.readouterr().out.split())  # the table's title wraps
    assert "read as a JSON array: no arrival times, all requests arrive at 0 s" in out
    assert main([*base, "--request-rate", "trace"]) == 2
    err = capsys.readouterr().err
    assert "--request-rate trace sends each request at its arrival time, and this trace has " \
        "none" in err and err.count("\n") == 1  # fmt: skip
