"""benchmarks/prefix_engine.py: the workloads as token ids (an answer repeated by a later
turn is the engine's own), the ideal counted offline, and a smoke run end to end on the
CPU (a tiny model, two layouts, with and without the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.sched.request import RequestSpec
from benchmarks import prefix_engine


def test_a_turn_waits_for_the_answer_it_repeats() -> None:
    first = RequestSpec(0, 0.0, 5, 3, (("system", 5),), "answer-0")
    second = RequestSpec(1, 0.0, 10, 2, (("system", 5), ("answer-0", 3), ("user", 2)))
    book = prefix_engine.TokenBook([first, second], vocab=50, seed=0)
    assert book.ready(first) and not book.ready(second)
    system = book.prompt(first)
    book.answered(first, [7, 8, 9])
    assert book.ready(second)
    prompt = book.prompt(second)
    assert prompt[:5] == system and prompt[5:8] == [7, 8, 9] and len(prompt) == 10
    assert all(3 <= t < 50 for t in prompt)


def test_the_ideal_counts_whole_pages_an_earlier_stream_began_with() -> None:
    unit = prefix_engine.IDEAL_UNIT_TOKENS
    a = list(range(3, 3 + 2 * unit))
    requests = [
        {"prompt": a, "tokens": [1] * unit, "submitted_s": 0.0, "spec": RequestSpec(0, 0, 32, 16)},
        # shares a's two pages and its answer's page, then leaves: 3 pages, not its last token
        {"prompt": a + [1] * unit + [5] * 3, "tokens": [2], "submitted_s": 1.0,
         "spec": RequestSpec(1, 0, 51, 1)},
        # the same first page only
        {"prompt": a[:unit] + [9] * unit, "tokens": [2], "submitted_s": 2.0,
         "spec": RequestSpec(2, 0, 32, 1)},
    ]  # fmt: skip
    assert prefix_engine.reusable_tokens(requests) == 3 * unit + unit


@pytest.mark.slow
def test_smoke_run_compares_with_and_without_the_cache(tmp_path: Path, capsys) -> None:
    out = tmp_path / "prefix_engine.json"
    code = prefix_engine.main(["--smoke", "--allocators", "avmp", "unified", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["workload"], r["allocator"], r["prefix_cache"]) for r in runs] == [
        (w, a, p) for w in prefix_engine.WORKLOADS for a in ("avmp", "unified")
        for p in ("off", "avmp")
    ]  # fmt: skip
    for run in runs:
        assert run["num_completed"] == run["num_requests"] == 5
    for off, on in zip(runs[::2], runs[1::2], strict=True):
        assert on["outputs"] == off["outputs"]  # greedy: identical with the cache
        saved = off["num_computed_tokens"] - on["num_computed_tokens"]
        assert saved == on["prefix"]["num_hit_tokens"] <= on["reusable_tokens"]
    agent = [r for r in runs if r["workload"] == "agent_loop" and r["prefix_cache"] == "avmp"]
    assert all(r["prefix"]["num_hit_tokens"] > 0 for r in agent)
    for run in runs:  # every completed request is on one side of the could-hit split
        split = run["ttft_could_hit"]["num_requests"] + run["ttft_rest"]["num_requests"]
        assert split == len(run["could_hit"]) == len(run["ttft_s"]) == run["num_completed"]
    assert all(r["ttft_could_hit"]["num_requests"] >= 1 for r in agent)
    assert result["dtype"] == "float32"  # the tiny CPU model's own
    assert "**agent_loop** (5 requests, float32 weights)" in printed
    assert "| avmp | avmp |" in printed
    assert "5 of 5 (5 with the same prompt) |" in printed
    assert prefix_engine.main(["--markdown", str(out)]) == 0  # the tables from the file alone
    tables = capsys.readouterr().out.strip()
    assert tables.startswith("granite-4.0-h-micro (tiny") and printed.rstrip().endswith(tables)
