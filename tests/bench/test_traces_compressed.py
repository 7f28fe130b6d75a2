"""Compressed trace files (.gz, .bz2, .xz): every format read as its plain file is, the
format guessed from the name inside, errors naming the file and line, and a broken
archive one TraceError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import COMPRESSED, TraceError, guess_format, read_trace, write_jsonl
from avmp.bench.workloads import make_prefix_workload
from avmp.cli import main

SUFFIXES = tuple(COMPRESSED)

AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,4808,10\n"
    "2023-11-16 18:15:50.9951690,3180,8\n"
)
BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "118,GPT-4,417,276,693,Conversation log\n"
)
MOONCAKE = (
    '{"timestamp": 1000, "input_length": 600, "output_length": 7, "hash_ids": [1, 2]}\n'
    '{"timestamp": 0, "input_length": 40, "output_length": 3}\n'
)
JSONL = (
    '{"arrival_s": 0, "prompt_tokens": 30, "output_tokens": 4, '
    '"segments": [["system", 20], ["q0", 10]], "output_segment": "a0"}\n'
    '{"arrival_s": 1, "prompt_tokens": 34, "output_tokens": 2, '
    '"segments": [["system", 20], ["q0", 10], ["a0", 4]]}\n'
)
TRACES = {
    "azure": ("azure.csv", AZURE),
    "burstgpt": ("burst.csv", BURSTGPT),
    "mooncake": ("mooncake_trace.jsonl", MOONCAKE),
    "jsonl": ("shared.jsonl", JSONL),
}


def _compress(path: Path, text: str, suffix: str) -> Path:
    packed = path.with_name(path.name + suffix)
    with COMPRESSED[suffix](packed, "wt", encoding="utf-8") as handle:
        handle.write(text)
    return packed


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("fmt", list(TRACES))
def test_every_format_reads_the_same_compressed(tmp_path: Path, fmt: str, suffix: str) -> None:
    name, text = TRACES[fmt]
    plain = tmp_path / name
    plain.write_text(text)
    packed = _compress(plain, text, suffix)
    assert guess_format(packed) == fmt
    assert read_trace(packed) == read_trace(plain) == read_trace(packed, fmt)


def test_the_inner_name_decides_jsonl_and_content_the_rest(tmp_path: Path) -> None:
    # no .jsonl inside: a JSONL file cannot be told from its header, a CSV can
    unnamed = _compress(tmp_path / "trace", JSONL, ".gz")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        read_trace(unnamed)
    assert len(read_trace(unnamed, "jsonl")) == 2
    assert guess_format(_compress(tmp_path / "azure", AZURE, ".xz")) == "azure"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_errors_name_the_compressed_file_and_the_line(tmp_path: Path, suffix: str) -> None:
    bad = JSONL + '{"arrival_s": 2, "prompt_tokens": 3}\n'
    packed = _compress(tmp_path / "t.jsonl", bad, suffix)
    with pytest.raises(TraceError, match=rf"^{packed}:3: missing field 'output_tokens'$"):
        read_trace(packed)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_corrupt_or_truncated_archive_is_one_trace_error(tmp_path: Path, suffix: str) -> None:
    rows = "".join(
        json.dumps({"arrival_s": i, "prompt_tokens": 10 + i % 7, "output_tokens": 2}) + "\n"
        for i in range(2000)
    )
    whole = _compress(tmp_path / "t.jsonl", rows, suffix).read_bytes()
    cases = {
        "junk": b"this is not an archive at all\n",
        "cut": whole[: len(whole) // 2],
        "flipped": whole[:40] + bytes(b ^ 0xFF for b in whole[40:80]) + whole[80:],
    }
    for case, data in cases.items():
        path = tmp_path / f"{case}.jsonl{suffix}"
        path.write_bytes(data)
        with pytest.raises(TraceError) as info:
            read_trace(path)
        message = str(info.value)
        assert message.startswith(f"{path}: corrupt or truncated") and "\n" not in message, case


def test_write_jsonl_compresses_by_name(tmp_path: Path) -> None:
    requests = make_prefix_workload("multi_turn_prefix", 0, num_requests=12)
    plain, packed = tmp_path / "t.jsonl", tmp_path / "t.jsonl.bz2"
    write_jsonl(requests, plain)
    write_jsonl(requests, packed)
    assert packed.read_bytes()[:3] == b"BZh"
    assert read_trace(packed) == read_trace(plain)


def test_replay_reads_a_compressed_trace(tmp_path: Path, capsys) -> None:
    name, text = TRACES["mooncake"]
    packed = _compress(tmp_path / name, text, ".gz")
    argv = ["replay", str(packed), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--allocators", "avmp", "--prefix-cache", "avmp"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 requests" in out and "| avmp | 2 | 0 |" in out
