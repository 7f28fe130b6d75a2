"""The Mooncake trace format: times, segments from hash ids (the partial last block, and
hash lists that do not fit the length), errors, guessing, and a replay that hits."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Hashable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.bench.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceError,
    guess_format,
    read_trace,
    write_jsonl,
)
from avmp.cli import main
from avmp.sched.prefix import unit_contents
from avmp.sched.request import RequestSpec

BLOCK = MOONCAKE_BLOCK_TOKENS


def _line(timestamp: object, prompt: object, output: object, ids: object = None) -> str:
    row = {"timestamp": timestamp, "input_length": prompt, "output_length": output}
    if ids is not None:
        row["hash_ids"] = ids
    return json.dumps(row) + "\n"


def _read(tmp_path: Path, *lines: str, name: str = "mooncake_trace.jsonl") -> list[RequestSpec]:
    path = tmp_path / name
    path.write_text("".join(lines))
    return read_trace(path, "mooncake")


def test_times_are_seconds_from_the_first_arrival_in_order(tmp_path: Path) -> None:
    requests = _read(
        tmp_path, _line(27482, 6955, 52), _line(1000, 300, 7), _line(3000.5, 40, 1, [])
    )
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == [
        (0.0, 300, 7),
        (2.0005, 40, 1),
        (26.482, 6955, 52),
    ]
    assert [r.request_id for r in requests] == [0, 1, 2]


def test_one_segment_per_hash_id_the_last_block_the_remainder(tmp_path: Path) -> None:
    ids = [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]
    partial, whole = _read(tmp_path, _line(0, 6955, 52, ids), _line(1, 2 * BLOCK, 5, [1, 2]))
    assert partial.segments == (
        *((i, BLOCK) for i in ids[:-1]),
        ((2354, 6955 - 13 * BLOCK), 6955 - 13 * BLOCK),
    )
    assert whole.segments == ((1, BLOCK), (2, BLOCK))


def test_a_shared_prefix_of_ids_shares_those_blocks_and_not_the_ones_after(
    tmp_path: Path,
) -> None:
    first, second = _read(
        tmp_path, _line(0, 2000, 5, [0, 1, 2, 3]), _line(1, 2048, 5, [0, 1, 7, 8])
    )
    assert first.segments[:2] == second.segments[:2]
    assert {c for c, _ in first.segments[2:]}.isdisjoint(c for c, _ in second.segments[2:])
    # as the prefix cache reads them, 16-token units: the first 64 agree, none after
    a, b = (unit_contents(r.segments, 2000 // 16, 16) for r in (first, second))
    assert a[:64] == b[:64] and all(x != y for x, y in zip(a[64:], b[64:], strict=False))


def test_a_partial_block_shares_only_with_the_same_partial_block(tmp_path: Path) -> None:
    # id 6 as a partial last block of 88 tokens, as a whole block, and as the same partial
    short, long, again = _read(
        tmp_path,
        _line(0, BLOCK + 88, 1, [5, 6]),
        _line(1, 2 * BLOCK, 1, [5, 6]),
        _line(2, BLOCK + 88, 1, [5, 6]),
    )
    assert short.segments == ((5, BLOCK), ((6, 88), 88))
    assert long.segments == ((5, BLOCK), (6, BLOCK))
    assert again.segments == short.segments


def test_ids_past_the_prompt_are_dropped(tmp_path: Path) -> None:
    # three ids for 600 tokens: the first two blocks, the second cut to what the prompt has
    (request,) = _read(tmp_path, _line(0, BLOCK + 88, 1, [1, 2, 3]))
    assert request.segments == ((1, BLOCK), ((2, 88), 88))


def test_tokens_past_the_ids_are_the_lines_own(tmp_path: Path) -> None:
    first, second = _read(
        tmp_path, _line(0, 1500, 1, [1]), _line(1, 1500, 1, [1]), name="short.jsonl"
    )
    assert first.segments == ((1, BLOCK), (("unhashed", 1), 1500 - BLOCK))
    assert second.segments == ((1, BLOCK), (("unhashed", 2), 1500 - BLOCK))


@pytest.mark.parametrize("tail", ["", ', "hash_ids": []', ', "hash_ids": null'])
def test_no_hash_ids_no_segments(tmp_path: Path, tail: str) -> None:
    line = f'{{"timestamp": 0, "input_length": 700, "output_length": 3{tail}}}\n'
    (request,) = _read(tmp_path, line)
    assert request.segments == () and request.output_segment is None


def test_sharing_survives_a_jsonl_copy(tmp_path: Path) -> None:
    requests = _read(
        tmp_path, _line(0, 600, 2, [1, 2]), _line(5, 600, 2, [1, 2]), _line(9, 1500, 2, [1])
    )
    copy = tmp_path / "copy.jsonl"
    write_jsonl(requests, copy)
    assert _sharing(read_trace(copy)) == _sharing(requests)


def _sharing(requests: list[RequestSpec]) -> list[list[tuple[int, int]]]:
    names: dict[Hashable, int] = {}
    return [[(names.setdefault(c, len(names)), n) for c, n in r.segments] for r in requests]


OK = _line(0, 10, 2, [1])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (OK + '{"input_length": 3, "output_length": 2}\n', ":2: missing field 'timestamp'"),
        (OK + '{"timestamp": 0, "output_length": 2}\n', ":2: missing field 'input_length'"),
        (OK + _line(0, -3, 2), ":2: input_length must be a whole number >= 0"),
        (OK + _line(0, 3, "x"), ":2: output_length must be a whole number >= 0"),
        (OK + _line(-1, 3, 2), ":2: timestamp must be >= 0 milliseconds"),
        (OK + _line("soon", 3, 2), ":2: timestamp must be a number of milliseconds"),
        (OK + _line(0, 0, 2), ":2: prompt and output tokens must be >= 1"),
        (OK + "[1, 2]\n", ":2: expected a JSON object with timestamp, input_length"),
        (OK + "not json\n", ":2:"),
        (OK + _line(0, 3, 2, "0,1"), ":2: hash_ids: a list of integers"),
        (OK + _line(0, 3, 2, ["a"]), ":2: hash_ids: each id is an integer, got 'a'"),
        (OK + _line(0, 3, 2, [True]), ":2: hash_ids: each id is an integer, got True"),
        (OK + _line(0, 3, 2, [1.5]), ":2: hash_ids: each id is an integer, got 1.5"),
        ("\n\n", "empty trace"),
    ],
)
def test_bad_lines_are_one_line_errors_naming_file_and_line(
    tmp_path: Path, text: str, where: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        read_trace(path, "mooncake")
    message = str(info.value)
    assert message.startswith(str(path)) and where in message and "\n" not in message


def test_the_format_is_guessed_from_the_first_line(tmp_path: Path) -> None:
    mooncake = tmp_path / "mooncake_trace.jsonl"
    mooncake.write_text("\n" + _line(0, 600, 3, [1, 2]))
    ours = tmp_path / "ours.jsonl"
    ours.write_text('{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n')
    other_name = tmp_path / "trace.txt"
    other_name.write_text(_line(0, 600, 3))
    assert [guess_format(p) for p in (mooncake, ours, other_name)] == [
        "mooncake",
        "jsonl",
        "mooncake",
    ]
    assert read_trace(mooncake)[0].segments == ((1, BLOCK), ((2, 88), 88))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 4 * BLOCK),
            st.lists(st.integers(0, 5), max_size=6),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_any_hash_list_reads_and_claims_no_sharing_its_ids_do_not_give(
    rows: list[tuple[int, list[int]]],
) -> None:
    # few ids, so they repeat at other places, as partial and whole blocks, and lists that
    # are too long or too short for their length
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.jsonl"
        path.write_text("".join(_line(i, n, 1, ids) for i, (n, ids) in enumerate(rows)))
        requests = read_trace(path, "mooncake")
    lengths: dict[Hashable, int] = {}
    for request in requests:
        for content, tokens in request.segments:
            assert lengths.setdefault(content, tokens) == tokens  # one id, one length
    for a, (_, ids_a) in zip(requests, rows, strict=True):
        for b, (_, ids_b) in zip(requests, rows, strict=True):
            for k, ((ca, na), (cb, _)) in enumerate(zip(a.segments, b.segments, strict=False)):
                if ca == cb and a is not b:
                    assert ids_a[k] == ids_b[k] and na <= BLOCK  # shared only by a hash id
                whole = min(len(ids_a), len(ids_b)) > k and na == BLOCK == b.segments[k][1]
                if whole and ids_a[k] == ids_b[k]:
                    assert ca == cb  # and every whole block the ids share is shared


def test_replay_with_the_prefix_cache_hits_on_shared_hash_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # eight prompts after one 4-block system prompt, each with two blocks of its own
    path = tmp_path / "mooncake_trace.jsonl"
    path.write_text(
        "".join(
            _line(1000 * i, 6 * BLOCK - 100, 8, [0, 1, 2, 3, 10 + 2 * i, 11 + 2 * i])
            for i in range(8)
        )
    )
    argv = ["replay", str(path), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--allocators", "avmp", "--format", "mooncake", "--prefix-cache", "avmp",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["num_completed"] == 8
    assert result["prefix"]["num_ideal_tokens"] == 7 * 4 * BLOCK
    assert result["prefix"]["num_hit_tokens"] > 0


def test_a_line_without_output_is_skipped_as_burstgpts_are(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(_line(0, 600, 0, [1, 2]) + _line(5, 600, 3, [1, 2]))
    (request,) = read_trace(path)
    assert (request.arrival_s, request.prompt_tokens, request.output_tokens) == (0.0, 600, 3)
