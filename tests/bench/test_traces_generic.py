"""Traces in shapes we did not write: a CSV or TSV whose header names the quantities by
any of `COLUMN_NAMES`, JSON objects under those names, a JSON array of them, and lengths
without arrival times; what was assumed is told (`TraceColumns`), never guessed silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmp.bench.traces import (
    COMPRESSED,
    TraceError,
    guess_format,
    read_trace,
    read_trace_part,
    write_jsonl,
)
from avmp.sched.request import RequestSpec


def _read(path: Path, text: str, **options: str) -> list[tuple[float, int, int]]:
    path.write_text(text, encoding="utf-8")
    return [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in read_trace(path, **options)]


def _told(path: Path, **options: str) -> str:
    columns = read_trace_part(path, **options).columns
    assert columns is not None
    return columns.describe()


# ---------------------------------------------------------------- CSV and TSV


def test_a_csv_header_names_the_quantities_in_any_spelling(tmp_path: Path) -> None:
    # any case, spaces/hyphens/underscores alike, camelCase; other columns ignored
    path = tmp_path / "log.csv"
    text = "Request ID,TimeStamp,Input Tokens,output-len,model\n7,5.5,10,3,x\n8,2,12,4,y\n"
    assert _read(path, text) == [(0.0, 12, 4), (3.5, 10, 3)]
    assert guess_format(path) == "csv"
    assert _told(path) == (
        "read as CSV: arrival time from 'TimeStamp' in seconds (the default where a name "
        "gives no unit; --time-unit to change it), prompt tokens from 'Input Tokens', "
        "output tokens from 'output-len'"
    )
    assert _read(tmp_path / "camel.csv", "ts,inputTokens,completionTokens\n1,2,3\n") == [
        (0.0, 2, 3)
    ]


def test_a_tsv_and_a_spreadsheets_byte_order_mark(tmp_path: Path) -> None:
    tsv = tmp_path / "trace.tsv"
    assert _read(tsv, "arrival_time\tprompt_len\tmax_tokens\n0.25\t9\t2\n") == [(0.0, 9, 2)]
    assert _told(tsv).startswith("read as TSV: arrival time from 'arrival_time'")
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbftimestamp,input_tokens,output_tokens\r\n3,4,5\r\n")
    assert read_trace(bom)[0].prompt_tokens == 4


@pytest.mark.parametrize(
    ("column", "unit"),
    [("arrival_s", 1), ("timestamp_ms", 1e3), ("Time (us)", 1e6), ("ts-ns", 1e9),
     ("arrival_time [ms]", 1e3), ("time s", 1)],
)  # fmt: skip
def test_a_time_name_that_gives_its_unit_is_read_in_it(
    tmp_path: Path, column: str, unit: float
) -> None:
    path = tmp_path / "t.csv"
    times = _read(path, f"{column},input_len,output_len\n0,2,1\n{3 * unit:.0f},2,1\n")
    assert times[1][0] == 3.0
    assert "as its name says" in _told(path) or column == "arrival_s"


@pytest.mark.parametrize(("time_unit", "seconds"), [("s", 1500.0), ("ms", 1.5),
                                                    ("us", 0.0015), ("ns", 1.5e-06)])  # fmt: skip
def test_time_unit_sets_the_unit_of_a_bare_time(
    tmp_path: Path, time_unit: str, seconds: float
) -> None:
    path = tmp_path / "t.csv"
    assert _read(path, "time,prompt_tokens,output_tokens\n0,2,1\n1500,2,1\n",
                 time_unit=time_unit)[1][0] == pytest.approx(seconds)  # fmt: skip
    assert "(--time-unit)" in _told(path, time_unit=time_unit)


def test_dates_and_times_are_read_as_dates(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    text = ("created,timestamp,prompt_tokens,output_tokens\n"
            "x,2024-03-01T10:00:00Z,5,1\nx,2024-03-01 10:00:02.5000001,6,1\n"
            "x,2024-03-01T11:00:03+01:00,7,1\n")  # fmt: skip
    assert [t for t, _, _ in _read(path, text)] == [0.0, 2.5, 3.0]
    assert "from 'timestamp' as ISO 8601 dates and times" in _told(path)


def test_the_first_of_several_names_is_read_and_the_rest_are_named(tmp_path: Path) -> None:
    # ours first; a time whose name gives its unit before a bare one; max_tokens last
    path = tmp_path / "t.csv"
    text = "time,timestamp_ms,input_len,prompt_tokens,max_tokens,completion_tokens\n0,0,1,2,99,3\n"
    assert _read(path, text) == [(0.0, 2, 3)]
    assert _told(path).endswith("not read: 'time', 'input_len', 'max_tokens'")
    assert "from 'timestamp_ms' in milliseconds" in _told(path)


def test_rows_without_output_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    assert _read(path, "ts,input_len,output_len\n0,5,0\n1,5,2\n2,5,0\n") == [(0.0, 5, 2)]
    assert _told(path).endswith("; 2 rows with 0 output tokens skipped")
    empty = tmp_path / "empty.csv"
    empty.write_text("ts,input_len,output_len\n0,5,0\n")
    with pytest.raises(TraceError, match=r"empty trace \(no requests; 1 row with 0 output"):
        read_trace(empty)


# ---------------------------------------------------------------- JSON


def test_json_objects_under_other_names_and_ours_first(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    text = (
        '{"timestamp": 4, "input_length": 3, "prompt_tokens": 8, "output_len": 2}\n'
        '{"timestamp": 1, "input_length": 3, "prompt_tokens": 9, "output_len": 1}\n'
    )
    assert _read(path, text) == [(0.0, 9, 1), (3.0, 8, 2)]  # seconds, not Mooncake's ms
    assert guess_format(path) == "jsonl"
    assert _told(path).startswith("read as JSON lines: arrival time from 'timestamp' in seconds")
    ours = tmp_path / "ours.jsonl"
    _read(ours, '{"arrival_s": 1, "prompt_tokens": 2, "output_tokens": 3, "timestamp": 9}\n')
    columns = read_trace_part(ours).columns
    assert columns is not None and not columns.is_generic and columns.arrival == "arrival_s"


def test_mooncake_is_still_told_by_its_fields_in_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    text = ('{"timestamp": 0, "input_length": 3, "output_length": 2}\n'
            '{"timestamp": 1500, "input_length": 3, "output_length": 2}\n')  # fmt: skip
    assert _read(path, text)[1][0] == 1.5
    assert guess_format(path) == "mooncake"
    assert _read(path, text, time_unit="s")[1][0] == 1500.0  # the format's unit, overridden
    assert "in seconds (--time-unit)" in _told(path, time_unit="s")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_reads_as_its_lines_would(tmp_path: Path, indent: int | None) -> None:
    rows = [{"arrival_s": 2, "prompt_tokens": 30, "output_tokens": 4,
             "segments": [["system", 20], ["q0", 10]], "output_segment": "a0"},
            {"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 1}]  # fmt: skip
    lines, array = tmp_path / "t.jsonl", tmp_path / "t.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    array.write_text(json.dumps(rows, indent=indent))
    assert guess_format(array) == "jsonl"
    assert read_trace(array) == read_trace(lines)
    assert read_trace(array)[1].segments == (("system", 20), ("q0", 10))


def test_a_json_array_of_mooncake_objects_is_mooncake(tmp_path: Path) -> None:
    rows = [{"timestamp": 500, "input_length": 600, "output_length": 7, "hash_ids": [1, 2]},
            {"timestamp": 0, "input_length": 40, "output_length": 3}]  # fmt: skip
    lines, array = tmp_path / "mooncake.jsonl", tmp_path / "mooncake.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    array.write_text(json.dumps(rows, indent=1))
    assert guess_format(array) == "mooncake"
    assert read_trace(array) == read_trace(lines)
    assert read_trace(array)[1].segments[0] == (1, 512)


# ---------------------------------------------------------------- no arrival times


@pytest.mark.parametrize(
    ("name", "text"),
    [("lengths.csv", "prompt_tokens,output_tokens\n7,2\n3,1\n"),
     ("lengths.json", '[{"input_len": 7, "output_len": 2}, {"input_len": 3, "output_len": 1}]'),
     ("lengths.jsonl", '{"prompt_tokens": 7, "output_tokens": 2}\n'
                       '{"prompt_tokens": 3, "output_tokens": 1}\n')],
)  # fmt: skip
def test_lengths_without_times_all_arrive_at_zero_and_say_so(
    tmp_path: Path, name: str, text: str
) -> None:
    path = tmp_path / name
    assert _read(path, text) == [(0.0, 7, 2), (0.0, 3, 1)]  # in file order
    assert "no arrival times, all requests arrive at 0 s" in _told(path)


# ---------------------------------------------------------------- round trips


@st.composite
def _traces(draw: st.DrawFn) -> list[RequestSpec]:
    """Requests whose arrivals are whole milliseconds, so every unit writes them exactly."""
    size = draw(st.integers(1, 12))
    gaps = draw(st.lists(st.integers(0, 5_000), min_size=size, max_size=size))
    lengths = st.tuples(st.integers(1, 100_000), st.integers(1, 4_000))
    sizes = draw(st.lists(lengths, min_size=size, max_size=size))
    arrivals = [sum(gaps[: i + 1]) - gaps[0] for i in range(size)]
    return [RequestSpec(i, ms / 1000, p, o) for i, (ms, (p, o)) in
            enumerate(zip(arrivals, sizes, strict=True))]  # fmt: skip


def _write(path: Path, text: str) -> Path:
    opener = COMPRESSED.get(path.suffix)
    if opener is None:
        path.write_text(text)
    else:
        with opener(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    return path


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=_traces(), suffix=st.sampled_from(["", *COMPRESSED]))
def test_csv_tsv_and_json_array_replay_the_same_requests_as_our_jsonl(
    tmp_path_factory: pytest.TempPathFactory, requests: list[RequestSpec], suffix: str
) -> None:
    root = tmp_path_factory.mktemp("round")
    ours = root / f"ours.jsonl{suffix}"
    write_jsonl(requests, ours)
    expected = read_trace(ours)
    assert expected == requests
    ms = [round(r.arrival_s * 1000) for r in requests]
    rows = list(zip(ms, requests, strict=True))
    csv_s = "id,arrival_s,input_length,completion_tokens\n" + "".join(
        f"{r.request_id},{r.arrival_s!r},{r.prompt_tokens},{r.output_tokens}\n" for _, r in rows)
    csv_ms = "Timestamp (ms),Prompt Tokens,Output Tokens\n" + "".join(
        f"{t},{r.prompt_tokens},{r.output_tokens}\n" for t, r in rows)
    tsv = "time\tinput_len\toutput_len\n" + "".join(
        f"{t}\t{r.prompt_tokens}\t{r.output_tokens}\n" for t, r in rows)
    array = json.dumps([{"timestamp_ms": t, "num_prompt_tokens": r.prompt_tokens,
                         "generated_tokens": r.output_tokens} for t, r in rows])  # fmt: skip
    assert read_trace(_write(root / f"s.csv{suffix}", csv_s)) == expected
    assert read_trace(_write(root / f"ms.csv{suffix}", csv_ms)) == expected
    assert read_trace(_write(root / f"t.tsv{suffix}", tsv), time_unit="ms") == expected
    assert read_trace(_write(root / f"a.json{suffix}", array)) == expected


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "text", "options", "message"),
    [
        ("none.csv", "a,b\n1,2\n", {}, r":1: cannot tell the trace format from its header "
         r"\(a, b\); pass --format, or name the columns .*prompt tokens prompt_tokens, "
         r"input_tokens, .*output tokens output_tokens"),
        ("none.csv", "a,b\n1,2\n", {"fmt": "csv"}, r":1: no column names the prompt or output "
         r"tokens; the names: arrival time arrival_s"),
        ("noout.csv", "ts,input_len\n1,2\n", {}, r":1: missing column 'output_tokens' \(nor "
         r"another name of the output tokens: output_len, .*max_tokens\) "
         r"\(header: ts, input_len\)"),
        ("named.csv", "timestamp_ms,input_len,output_len\n1,2,3\n", {"time_unit": "s"},
         r":1: column 'timestamp_ms' gives its times in milliseconds; --time-unit s contradicts"),
        ("dates.csv", "time,input_len,output_len\n2024-01-01 10:00,2,3\n", {"time_unit": "ms"},
         r":2: column 'time' holds dates and times \('2024-01-01 10:00'\), not numbers of a "
         r"unit: --time-unit does not apply"),
        ("mixed.csv", "time,input_len,output_len\n1,2,3\n\n2024-01-01,2,3\n", {},
         r":4: time must be a number of seconds, got '2024-01-01'"),
        ("mixed2.csv", "time,input_len,output_len\n2024-01-01,2,3\n5,2,3\n", {},
         r":3: time must be an ISO 8601 date and time, as its first row's, got '5'"),
        ("hole.csv", "time,input_len,output_len\n1,2,3\n2,,3\n", {},
         r":3: no value in column input_len$"),
        ("neg.tsv", "time\tinput_len\toutput_len\n1\t-2\t3\n", {},
         r":2: input_len must be a whole number >= 0, got '-2'"),
        ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-01-01,2,3\n",
         {"time_unit": "s"}, r":1: the Azure trace's TIMESTAMP holds dates and times"),
        ("ours.jsonl", '{"arrival_s": 1, "prompt_tokens": 2, "output_tokens": 3}\n',
         {"time_unit": "ms"}, r":1: field 'arrival_s' gives its times in seconds; --time-unit "
         r"ms contradicts it"),
        ("later.jsonl", '{"ts": 1, "input_len": 2, "output_len": 3}\n\n{"ts": 1, "input_len": 2}\n',
         {}, r":3: missing field 'output_len'$"),
        ("foo.jsonl", '{"foo": 1}\n', {}, r":1: no field names the prompt or output tokens"),
        ("first.txt", '{"arrival_s": 1, "prompt_tokens": 2, "output_tokens": 3}\n', {},
         r":1: cannot tell the trace format: its first line is a JSON object but its name ends "
         r"in neither .jsonl nor .json; rename it or pass --format jsonl"),
        ("a.json", '[\n {"ts": 1, "input_len": 2, "output_len": 3},\n {"ts": 2, "input_len": 2}\n]',
         {}, r":3: element 1: missing field 'output_len'$"),
        ("b.json", '[{"ts": 1, "input_len": 2, "output_len": 3}, {"ts": 1, "input_len": 0, '
         '"output_len": 3}]', {}, r":1: element 1: prompt and output tokens must be >= 1$"),
        ("c.json", '[\n {"ts": 1, "input_len": 2, "output_len": 3}\n {"ts": 2}\n]', {},
         r":3: Expecting ',' delimiter: line 3 column 2"),
        ("d.json", '[{"ts": 1, "input_len": 2, "output_len": 3},\n]', {},
         r":2: Illegal trailing comma before end of array"),
        ("e.json", '[{"ts": 1, "input_len": 2, "output_len": 3}]\n[]', {}, r":2: Extra data"),
        ("f.json", '[{"ts": 1, "input_len": 2, "output_len": 3}, 7]', {},
         r":1: element 1: expected a JSON object with ts, input_len, output_len$"),
        ("g.json", "[]", {}, r": empty trace \(no requests\)$"),
        ("h.json", '[{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 1, '
         '"segments": [["s", 2]]}]', {}, r":1: element 0: request 0: segments hold 2 tokens"),
    ],
)  # fmt: skip
def test_every_new_error_is_one_line_naming_the_file_and_line(
    tmp_path: Path, name: str, text: str, options: dict[str, str], message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        read_trace(path, **options)
    error = str(info.value)
    assert error.startswith(str(path)) and "\n" not in error
    assert re.search(message, error), error


def test_an_unknown_time_unit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ts,input_len,output_len\n1,2,3\n")
    with pytest.raises(TraceError, match="unknown time unit 'h'; known: s, ms, us, ns"):
        read_trace(path, time_unit="h")


@pytest.mark.parametrize("suffix", list(COMPRESSED))
def test_the_new_shapes_compressed_are_guessed_and_name_their_lines(
    tmp_path: Path, suffix: str
) -> None:
    csv_text = "timestamp,input_tokens,output_tokens\n1,2,3\n2,x,3\n"
    packed = _write(tmp_path / f"t.csv{suffix}", csv_text)
    assert guess_format(packed) == "csv"
    with pytest.raises(TraceError, match=rf"^{packed}:3: input_tokens must be a whole number"):
        read_trace(packed)
    array = _write(tmp_path / f"t.json{suffix}", '[\n{"ts": 1, "input_len": 2, "output_len": 3}\n]')
    assert guess_format(array) == "jsonl" and len(read_trace(array)) == 1
