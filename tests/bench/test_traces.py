from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import TraceError, read_trace, write_jsonl
from avmp.bench.workloads import make_workload


def test_jsonl_round_trip(tmp_path: Path) -> None:
    reqs = make_workload("uniform_short", 0, num_requests=10)
    path = tmp_path / "t.jsonl"
    write_jsonl(reqs, path)
    assert read_trace(path) == reqs


def test_jsonl_sorted_and_rebased(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival_s": 5, "prompt_tokens": 3, "output_tokens": 2}\n\n'
        '{"arrival_s": 2.5, "prompt_tokens": 7, "output_tokens": 1}\n'
    )
    reqs = read_trace(path)
    assert [(r.arrival_s, r.prompt_tokens) for r in reqs] == [(0.0, 7), (2.5, 3)]


def test_azure_csv(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,4808,10\n"
        "2023-11-16 18:15:50.9951690,3180,8\n"
    )
    reqs = read_trace(path)
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (reqs[0].prompt_tokens, reqs[0].output_tokens) == (4808, 10)


def test_burstgpt_csv_skips_failed_requests(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118,GPT-4,417,276,693,Conversation log\n"
    )
    reqs = read_trace(path, "burstgpt")
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs] == [
        (0.0, 472, 18),
        (113.0, 417, 276),
    ]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "bad.jsonl",
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\nnot json\n',
            ":2:",
        ),
        (
            "miss.jsonl",
            '{"arrival_s": 0, "prompt_tokens": 3}\n',
            ":1: missing field 'output_tokens'",
        ),
        ("neg.jsonl", '{"arrival_s": 0, "prompt_tokens": -3, "output_tokens": 2}\n', ":1:"),
        ("zero.jsonl", '{"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 2}\n', ":1:"),
        ("empty.jsonl", "\n\n", "empty trace"),
        ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12,x\n", ":2:"),
        ("date.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,12,3\n", ":2:"),
        ("cols.csv", "Timestamp,Model,Request tokens\n1,a,2\n", "missing column"),
    ],
)
def test_malformed_traces_name_file_and_line(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    fmt = "burstgpt" if name == "cols.csv" else None
    with pytest.raises(TraceError) as info:
        read_trace(path, fmt)
    assert str(path) in str(info.value) and where in str(info.value)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "nope.jsonl")
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        read_trace(path)


OK = '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n'
BURST = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "nan.jsonl",
            OK + '{"arrival_s": NaN, "prompt_tokens": 3, "output_tokens": 2}\n',
            ":2: arrival_s must be finite",
        ),
        (
            "inf.jsonl",
            OK + '{"arrival_s": Infinity, "prompt_tokens": 3, "output_tokens": 2}\n',
            ":2: arrival_s must be finite",
        ),
        (
            "inftok.jsonl",
            '{"arrival_s": 0, "prompt_tokens": Infinity, "output_tokens": 2}\n',
            ":1: prompt_tokens must be a whole number",
        ),
        (
            "bool.jsonl",
            '{"arrival_s": 0, "prompt_tokens": true, "output_tokens": 2}\n',
            ":1: prompt_tokens must be a whole number >= 0, got True",
        ),
        (
            "frac.jsonl",
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2.5}\n',
            ":1: output_tokens must be a whole number",
        ),
        (
            "booltime.jsonl",
            '{"arrival_s": false, "prompt_tokens": 3, "output_tokens": 2}\n',
            ":1: arrival_s must be a number of seconds",
        ),
        ("list.jsonl", "[1, 2]\n", ":1: expected a JSON object"),
        ("null.jsonl", "null\n", ":1: expected a JSON object"),
        (
            "span.jsonl",
            '{"arrival_s": 1e308, "prompt_tokens": 3, "output_tokens": 2}\n'
            '{"arrival_s": -1e308, "prompt_tokens": 3, "output_tokens": 2}\n',
            "span more seconds",
        ),
        ("nan.csv", BURST + "nan,a,4,2,6,x\n", ":2: Timestamp must be finite"),
        ("hole.csv", BURST + "5,a\n", ":2: no value in column Request tokens"),
        ("nul.csv", BURST + "5,a,4\x00,2,6,x\n", ":2: Request tokens must be a whole number"),
    ],
)
def test_non_finite_and_mistyped_values_name_file_and_line(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        read_trace(path, "burstgpt" if name.endswith(".csv") else None)
    message = str(info.value)
    assert message.startswith(str(path)) and where in message and "\n" not in message


@pytest.mark.parametrize("name", ["junk.jsonl", "junk.csv"])
def test_binary_junk_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x8a\xff" + bytes(range(128, 256)) * 3)
    with pytest.raises(TraceError, match=f"^{path}: not a UTF-8 text file"):
        read_trace(path)


def test_a_directory_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is a directory"):
        read_trace(tmp_path)


def test_whole_numbers_written_as_digits_or_floats_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival_s": "1.5", "prompt_tokens": "12", "output_tokens": 3.0}\n'
        '{"arrival_s": 0, "prompt_tokens": 12345678901234567890, '
        '"output_tokens": 1}\n'
    )
    reqs = read_trace(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs] == [
        (0.0, 12345678901234567890, 1),
        (1.5, 12, 3),
    ]


def test_jsonl_segments_round_trip_and_are_optional(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    path.write_text(
        '{"arrival_s": 0, "prompt_tokens": 30, "output_tokens": 4, '
        '"segments": [["system", 20], ["q0", 10]], "output_segment": "a0"}\n'
        '{"arrival_s": 1, "prompt_tokens": 44, "output_tokens": 4, '
        '"segments": [["system", 20], ["q0", 10], ["a0", 4], [7, 10]]}\n'
        '{"arrival_s": 2, "prompt_tokens": 5, "output_tokens": 1}\n'
    )
    first, second, plain = read_trace(path)
    assert first.segments == (("system", 20), ("q0", 10)) and first.output_segment == "a0"
    assert second.segments[-1] == (7, 10) and second.output_segment is None
    assert plain.segments == () and plain.output_segment is None
    again = tmp_path / "again.jsonl"
    write_jsonl([first, second, plain], again)
    assert read_trace(again) == [first, second, plain]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('"segments": [["s", 20]]', "segments hold 20 tokens, the prompt 30"),
        ('"segments": [["s", 0], ["t", 30]]', "segment lengths must be >= 1"),
        ('"segments": [[true, 30]]', "a content id is a string or an integer"),
        ('"segments": [["s", 30, 1]]', r"each piece is \[content id, tokens\]"),
        ('"segments": "s"', "a list of"),
        ('"segments": [["s", 30]], "output_segment": [1]', "output_segment: a content id"),
    ],
)
def test_bad_segments_name_the_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 1}\n'
        f'{{"arrival_s": 1, "prompt_tokens": 30, "output_tokens": 1, {row}}}\n'
    )
    with pytest.raises(TraceError, match=rf"bad.jsonl:2: .*{message}"):
        read_trace(path)


def test_a_prefix_workload_keeps_what_it_shares_through_a_file(tmp_path: Path) -> None:
    # the workloads name content by tuples; a file holds their JSON text, one per id
    from avmp.bench.workloads import make_prefix_workload

    requests = make_prefix_workload("multi_turn_prefix", 0, num_requests=24)
    path = tmp_path / "prefix.jsonl"
    write_jsonl(requests, path)
    back = read_trace(path)

    def sharing(specs: list) -> list:
        names: dict = {}
        return [[(names.setdefault(i, len(names)), n) for i, n in spec.content()] for spec in specs]

    assert any(r.segments for r in requests)
    assert sharing(back) == sharing(requests)


def test_azure_rows_without_output_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.0,12,0\n2023-11-16 18:15:47.5,20,4\n")  # fmt: skip
    (request,) = read_trace(path)
    assert (request.arrival_s, request.prompt_tokens, request.output_tokens) == (0.0, 20, 4)


def test_a_window_takes_part_of_a_trace_and_only_its_content(tmp_path: Path) -> None:
    """The requests arriving in the window, re-based to 0, ids kept, their segments read;
    a line outside it is not read for its content (its own prompt is never replayed)."""
    from avmp.bench.traces import TraceWindow, read_trace_part

    path = tmp_path / "t.jsonl"
    lines = [{"arrival_s": 10 + t, "prompt_tokens": 4, "output_tokens": 1,
              "segments": [["system", 4]]} for t in range(6)]  # fmt: skip
    lines[0]["segments"] = "not a list"  # before the window: never parsed
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    part = read_trace_part(path, window=TraceWindow(start_s=2, duration_s=3, max_requests=2))
    assert [(r.request_id, r.arrival_s, r.segments) for r in part.requests] == [
        (2, 0.0, (("system", 4),)), (3, 1.0, (("system", 4),))]  # fmt: skip
    assert (part.num_trace_requests, part.trace_span_s) == (6, 5.0)
    assert read_trace_part(path, window=TraceWindow(start_s=4.5)).requests[0].request_id == 5
    with pytest.raises(TraceError, match="t.jsonl: no request arrives from 7 s to 8 s"):
        read_trace_part(path, window=TraceWindow(start_s=7, duration_s=1))
    with pytest.raises(TraceError, match="segments"):
        read_trace(path)  # the whole trace reads every line's content


@pytest.mark.parametrize("fields, message", [
    ({"start_s": -1.0}, "start must be >= 0"),
    ({"duration_s": 0.0}, "duration must be > 0"),
    ({"max_requests": 0}, "max_requests must be a whole number >= 1"),
    ({"max_requests": True}, "max_requests must be a whole number >= 1"),
])  # fmt: skip
def test_a_bad_window_is_refused(fields: dict, message: str) -> None:
    from avmp.bench.traces import TraceWindow

    with pytest.raises(ValueError, match=message):
        TraceWindow(**fields)
