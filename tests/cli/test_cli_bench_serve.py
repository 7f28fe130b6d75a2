from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest

from avmp.bench import loadgen
from avmp.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from fake_openai_server import MODEL, FakeBehaviour, fake_server, free_port  # noqa: E402

FAST = FakeBehaviour(first_token_s=0.005, token_gap_s=0.0005)


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    with fake_server(FAST) as running:
        yield running


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "avmp-cache"))


def test_bench_alone_still_runs_the_evaluation_and_serve_is_a_subcommand() -> None:
    from avmp.cli import bench, bench_serve

    alone = build_parser().parse_args(["bench", "--quick", "--out", "x", "--seeds", "2"])
    assert alone.run is bench.run and alone.bench_command is None and alone.seeds == 2
    serve = build_parser().parse_args(["bench", "serve", "--url", "http://h:1"])
    assert serve.run is bench_serve.run_serve and serve.request_rate == "inf"


def test_serve_bench_against_a_server_saves_every_rate(server, tmp_path: Path, capsys) -> None:
    url, state = server
    out = tmp_path / "serve.json"
    args = [
        "bench",
        "serve",
        "--url",
        url,
        "--workload",
        "uniform_short",
        "--num-prompts",
        "6",
        "--request-rate",
        "40,inf",
        "--max-concurrency",
        "3",
        "--warmup",
        "2",
        "--goodput",
        "ttft:5000",
        "tpot:1000",
        "--percentiles",
        "50,99",
        "--out",
        str(out),
        "--no-progress",
    ]
    before = len(state.bodies)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "40/s cap 3" in printed and "inf cap 3" in printed and "TTFT" in printed
    assert len(state.bodies) - before == 2 + 2 * 6  # warm-up, then each rate
    result = json.loads(out.read_text())
    assert result["model"] == MODEL and result["url"] == url
    assert [e["request_rate"] for e in result["results"]] == ["40", "inf"]
    for entry in result["results"]:
        summary = entry["summary"]
        assert summary["completed"] == 6 and summary["goodput"] > 0
        assert set(summary["ttft_ms"]) == {"mean", "median", "p50", "p99"}
        assert len(entry["requests"]) == 6
        assert sum(r["max_tokens"] for r in entry["requests"]) == summary["output_tokens"]
    assert result["settings"]["dataset"] == "workload uniform_short"


def test_serve_bench_sharegpt_over_chat(server, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = server
    monkeypatch.setattr(
        loadgen, "sharegpt_requests", functools.partial(loadgen.sharegpt_requests, limit=400)
    )
    args = [
        "bench",
        "serve",
        "--url",
        url,
        "--endpoint",
        "chat",
        "--num-prompts",
        "3",
        "--no-ignore-eos",
        "--no-progress",
        "--api-key",
        "k",
        "--sharegpt-output-len",
        "3",
    ]
    assert main(args) == 0
    body = state.bodies[-1]
    assert isinstance(body["messages"][0]["content"], str) and "ignore_eos" not in body
    assert body["max_tokens"] == 3  # --sharegpt-output-len, not the dataset answer's length


def test_every_request_failing_is_reported_and_exits_1(capsys) -> None:
    with fake_server(FakeBehaviour(fail_every=1)) as (url, _):
        args = [
            "bench",
            "serve",
            "--url",
            url,
            "--workload",
            "uniform_short",
            "--num-prompts",
            "2",
            "--warmup",
            "0",
            "--no-progress",
        ]
        assert main(args) == 1
    captured = capsys.readouterr()
    assert "2 x HTTP 500: fake failure" in captured.out
    assert "no request completed" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "localhost:8000"], "bad server URL"),
        (["--url", f"http://127.0.0.1:{free_port()}"], "cannot reach"),
        (["--goodput", "ttft=5"], "bad goodput objective"),
        (["--goodput", "ttft:0"], "MS must be a positive number"),
        (["--request-rate", "fast"], "--request-rate: 'fast' is not a rate"),
        (["--request-rate", "-2"], "is not a rate > 0"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--percentiles", "0,50"], "--percentiles"),
        (["--burstiness", "0"], "--burstiness must be a positive number"),
        (["--trace", "/no/such.jsonl"], "no such trace file"),
        (["--request-rate", "trace"], "--request-rate trace needs --trace FILE"),
        (["--request-rate", "trace", "--workload", "shift"], "needs --trace FILE"),
        (["--request-rate", "4,trace"], "it cannot be mixed with rates"),
        (["--time-scale", "0.5"], "--time-scale goes with --request-rate trace"),
        (
            ["--request-rate", "trace", "--trace", "{trace}", "--time-scale", "0"],
            "--time-scale must be a positive number, got 0.0",
        ),
        (
            ["--request-rate", "trace", "--trace", "{trace}", "--burstiness", "2"],
            "--burstiness shapes a rate's gaps",
        ),
        (["--endpoint", "chat", "--workload", "shift"], "--endpoint chat needs text prompts"),
        (
            ["--url", "{url}/nowhere", "--model", "m", "--workload", "shift"],
            "every warm-up request failed",
        ),
        (["--url", "{url}/nowhere"], "/nowhere/v1/models: HTTP 404"),
        (["--random-input-len", "8", "--trace", "{trace}"], "cannot go with --trace"),
        (["--random-output-len", "8", "--workload", "shift"], "cannot go with --workload"),
        (["--random-range-ratio", "0.5"], "--random-range-ratio goes with --random-input-len"),
        (["--random-prefix-len", "4"], "--random-prefix-len goes with --random-input-len"),
        (["--random-input-len", "8", "--random-range-ratio", "1"], "--random-range-ratio must"),
        (["--random-output-len", "0"], "--random-output-len must be >= 1, got 0"),
        (["--random-input-len", "-1"], "--random-input-len must be >= 0"),
        (["--random-input-len", "0"], "the shortest prompt would have no token"),
        (["--random-input-len", "8", "--endpoint", "chat"], "--endpoint chat needs text prompts"),
        (["--sharegpt-output-len", "4", "--workload", "shift"], "--sharegpt-output-len goes"),
        (["--sharegpt-output-len", "0"], "--sharegpt-output-len must be >= 1"),
        (["--num-turns", "3"], "--num-turns goes with --multi-turn"),
        (["--think-time", "1"], "--think-time goes with --multi-turn"),
        (["--multi-turn", "--think-time", "-1"], "--think-time must be >= 0 seconds"),
        (["--multi-turn", "--workload", "shift"], "--multi-turn sends ShareGPT's conversations"),
        (["--multi-turn", "--trace", "{trace}"], "it cannot go with --trace"),
        (["--multi-turn", "--endpoint", "completions"], "it needs --endpoint chat"),
        (["--multi-turn", "--random-input-len", "8"], "it needs --num-turns and --tokenizer"),
        (["--multi-turn", "--request-rate", "trace"], "--request-rate trace needs --trace"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    server, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    url, _ = server
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 4, "output_tokens": 2}\n')
    args = [a.format(url=url, trace=trace) for a in args]
    full = ["bench", "serve", "--url", url, "--num-prompts", "2", "--no-progress", *args]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("avmp bench serve: error: ")  # as argparse's own errors name it


def test_random_dataset_prompts_reach_the_server(server, tmp_path: Path) -> None:
    """vLLM's flags: token-id prompts of the shared prefix and a length in the range."""
    url, state = server
    out = tmp_path / "r.json"
    args = ["bench", "serve", "--url", url, "--random-input-len", "20", "--random-output-len",
            "4", "--random-range-ratio", "0.5", "--random-prefix-len", "6", "--num-prompts",
            "8", "--warmup", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    prompts = [b["prompt"] for b in state.bodies[before:]]
    assert len(prompts) == 8 and all(p[:6] == prompts[0][:6] for p in prompts)
    assert all(10 <= len(p) - 6 <= 30 for p in prompts)
    assert {b["max_tokens"] for b in state.bodies[before:]} <= {2, 3, 4, 5, 6}
    result = json.loads(out.read_text())
    assert result["settings"]["dataset"] == "random (input 20 +-50%, output 4 +-50%, prefix 6)"
    assert result["settings"]["multi_turn"] is None
    assert result["results"][0]["summary"]["input_tokens"] == sum(len(p) for p in prompts)


def test_trace_as_text_over_chat_with_a_tokenizer(server, tmp_path: Path, capsys) -> None:
    from test_loadgen import word_tokenizer

    url, state = server
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"arrival_s": i, "prompt_tokens": 4 + i, "output_tokens": 3}) + "\n"
        for i in range(3)
    ))  # fmt: skip
    tokenizer = word_tokenizer(tmp_path / "tok")
    args = ["bench", "serve", "--url", url, "--trace", str(trace), "--tokenizer", str(tokenizer),
            "--endpoint", "chat", "--warmup", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    contents = [b["messages"][0]["content"] for b in state.bodies[-3:]]
    assert sorted(len(c.split()) for c in contents) == [4, 5, 6]  # sent all at once


def test_the_trace_timing_from_a_compressed_trace_saves_and_reports(
    server, tmp_path: Path, capsys
) -> None:
    """--request-rate trace sends each request at its arrival x --time-scale; the result
    names the schedule and `avmp report` draws it."""
    import gzip

    url, state = server
    arrivals = [0.0, 3.0, 3.0, 8.0]
    trace = tmp_path / "t.jsonl.gz"
    with gzip.open(trace, "wt") as handle:
        for i, arrival in enumerate(arrivals):
            row = {"arrival_s": 100 + arrival, "prompt_tokens": 4 + i, "output_tokens": 2}
            handle.write(json.dumps(row) + "\n")
    out = tmp_path / "r.json"
    args = ["bench", "serve", "--url", url, "--trace", str(trace), "--request-rate", "trace",
            "--time-scale", "0.05", "--warmup", "0", "--out", str(out),
            "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    assert "trace x0.05" in capsys.readouterr().out
    assert sorted(len(b["prompt"]) for b in state.bodies[before:]) == [4, 5, 6, 7]
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["request_rate"] == "trace" and entry["time_scale"] == 0.05
    starts = [r["start_s"] for r in entry["requests"]]
    for start, arrival in zip(starts, arrivals, strict=True):
        assert arrival * 0.05 - 1e-3 <= start < arrival * 0.05 + 0.15
    assert entry["summary"]["completed"] == 4 and 0.4 <= entry["summary"]["duration_s"] < 1.5
    assert main(["report", str(out)]) == 0
    assert "trace x0.05" in capsys.readouterr().out
    assert out.with_name("r.latency.png").stat().st_size > 0


def test_a_mooncake_traces_sharing_and_timing_reach_the_server(
    server, tmp_path: Path, capsys
) -> None:
    """Requests whose hash ids agree send the same leading token ids (a 512-token block
    each), the rest differ; each leaves at its timestamp x --time-scale."""
    url, state = server
    rows = [  # timestamps in ms
        {"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [7, 8]},
        {"timestamp": 4000, "input_length": 700, "output_length": 2, "hash_ids": [7, 9]},
        {"timestamp": 6000, "input_length": 300, "output_length": 2, "hash_ids": [7]},
        {"timestamp": 9000, "input_length": 520, "output_length": 2},
    ]
    trace = tmp_path / "mooncake_trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    args = ["bench", "serve", "--url", url, "--trace", str(trace), "--request-rate", "trace",
            "--time-scale", "0.02", "--warmup", "0", "--out", str(out),
            "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    by_length = {len(b["prompt"]): b["prompt"] for b in state.bodies[before:]}
    first, second, partial, plain = by_length[600], by_length[700], by_length[300], by_length[520]
    assert first[:512] == second[:512] and first[512:] != second[512:600]
    # a partial block is its own content: it shares with no whole block
    assert partial != first[:300] and plain[:512] != first[:512]
    (entry,) = json.loads(out.read_text())["results"]
    starts = [r["start_s"] for r in entry["requests"]]
    for start, row in zip(starts, rows, strict=True):
        due = row["timestamp"] / 1000 * 0.02
        assert due - 1e-3 <= start < due + 0.15


def test_a_jsonl_conversation_sends_its_history_as_the_same_ids(server, tmp_path: Path) -> None:
    url, state = server
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"arrival_s": 0, "prompt_tokens": 30, "output_tokens": 4, '
        '"segments": [["system", 20], ["q0", 10]], "output_segment": "a0"}\n'
        '{"arrival_s": 1, "prompt_tokens": 25, "output_tokens": 2, '
        '"segments": [["system", 20], ["q9", 5]]}\n'
        '{"arrival_s": 2, "prompt_tokens": 38, "output_tokens": 2, '
        '"segments": [["system", 20], ["q0", 10], ["a0", 4], ["q1", 4]]}\n'
    )
    args = ["bench", "serve", "--url", url, "--trace", str(trace), "--warmup", "0",
            "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    by_length = {len(b["prompt"]): b["prompt"] for b in state.bodies[before:]}
    first, other, turn = by_length[30], by_length[25], by_length[38]
    assert turn[:30] == first and other[:20] == first[:20] and other[20:] != first[20:25]


def _by_conversation(bodies: list[dict]) -> dict[str, list[dict]]:
    """The bodies of each conversation (named by its first message), in arrival order."""
    by_first: dict[str, list[dict]] = {}
    for body in bodies:
        by_first.setdefault(body["messages"][0]["content"], []).append(body)
    return by_first


@pytest.fixture
def few_conversations(monkeypatch: pytest.MonkeyPatch) -> None:
    """ShareGPT's conversations picked from its first 400 (quick to read)."""
    monkeypatch.setattr(
        loadgen,
        "sharegpt_conversations",
        functools.partial(loadgen.sharegpt_conversations, limit=400),
    )


@pytest.mark.usefixtures("few_conversations")
def test_multi_turn_sharegpt_sends_each_history_and_reports_ttft_by_turn(
    server, tmp_path: Path, capsys
) -> None:
    url, state = server
    out = tmp_path / "mt.json"
    args = ["bench", "serve", "--url", url, "--multi-turn", "--num-prompts", "4", "--num-turns",
            "3", "--sharegpt-output-len", "5", "--max-concurrency", "2", "--think-time", "0.01",
            "--warmup", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "TTFT by turn" in printed and "conversations" in printed
    bodies = state.bodies[before:]
    warmup, measured = bodies[0], bodies[1:]
    result = json.loads(out.read_text())
    (entry,) = result["results"]
    turns = entry["summary"]["turns"]
    assert turns["conversations"] == turns["conversations_completed"] == 4
    assert (
        [entry["summary"]["completed"]]
        == [len(measured)]
        == result["settings"]["multi_turn"]["turns"]
    )
    first = [r for r in entry["requests"] if r["conversation"] == 0]
    assert [r["turn"] for r in first] == list(range(first[0]["conversation_turns"]))
    conversations = _by_conversation(measured)
    assert len(conversations) == 4 and warmup["messages"][0]["content"] not in conversations
    assert any(len(sent) > 1 for sent in conversations.values())
    for sent in conversations.values():
        assert len(sent) <= 3 and all(b["max_tokens"] == 5 for b in sent)
        for before_turn, body in zip(sent, sent[1:], strict=False):
            # the previous turn's messages, the server's own answer to it word for word,
            # and the next message
            answer = state.answers[state.bodies.index(before_turn)]
            assert body["messages"][:-2] == before_turn["messages"]
            assert body["messages"][-2] == {"role": "assistant", "content": answer}
            assert body["messages"][-1]["role"] == "user"
    assert main(["report", str(out)]) == 0
    assert "2+" in capsys.readouterr().out


@pytest.mark.usefixtures("few_conversations")
def test_each_rate_sends_conversations_of_its_own(server, tmp_path: Path) -> None:
    """A prefix cache cannot hold a rate's first turns from an earlier rate or the warm-up."""
    url, state = server
    out = tmp_path / "mt.json"
    args = ["bench", "serve", "--url", url, "--multi-turn", "--num-prompts", "2", "--num-turns",
            "1", "--sharegpt-output-len", "2", "--request-rate", "50,inf", "--warmup", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    firsts = [b["messages"][0]["content"] for b in state.bodies[before:]]
    assert len(firsts) == len(set(firsts)) == 1 + 2 * 2
    result = json.loads(out.read_text())
    assert result["settings"]["multi_turn"]["turns"] == [2, 2]
    assert [e["summary"]["turns"]["conversations_completed"] for e in result["results"]] == [2, 2]


def test_synthetic_multi_turn_with_a_tokenizer(server, tmp_path: Path) -> None:
    from test_loadgen import word_tokenizer

    url, state = server
    tokenizer = word_tokenizer(tmp_path / "tok")
    args = ["bench", "serve", "--url", url, "--multi-turn", "--random-input-len", "6",
            "--random-output-len", "3", "--random-prefix-len", "4", "--num-turns", "3",
            "--tokenizer", str(tokenizer), "--num-prompts", "2", "--warmup", "0",
            "--no-progress"]  # fmt: skip
    before = len(state.bodies)
    assert main(args) == 0
    conversations = _by_conversation(state.bodies[before:])
    assert sorted(len(sent) for sent in conversations.values()) == [3, 3]
    for sent in conversations.values():
        users = [m["content"] for m in sent[-1]["messages"] if m["role"] == "user"]
        assert [len(u.split()) for u in users] == [10, 6, 6]
    first = [sent[0]["messages"][0]["content"].split()[:4] for sent in conversations.values()]
    assert first[0] == first[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokenizer", "x"], "--tokenizer goes with --trace, --workload or --random-input-len"),
        (["--workload", "shift", "--tokenizer", "/no/such/dir"], "/no/such/dir"),
        (["--workload", "shift", "--tokenizer", "{empty}"], "{empty}: no tokenizer files in"),
    ],
)
def test_bad_tokenizer_is_one_line(
    server, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    """A directory without tokenizer files is named as such (transformers blamed a
    missing sentencepiece or tiktoken)."""
    url, _ = server
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    args = [a.replace("{empty}", str(tmp_path / "checkpoint")) for a in args]
    message = message.replace("{empty}", str(tmp_path / "checkpoint"))
    assert main(["bench", "serve", "--url", url, "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_against_avmp_serve_with_a_tiny_model(tmp_path: Path, capsys) -> None:
    """A dozen requests through the real server: every token asked for comes back and the
    server's own usage counts them."""
    import subprocess

    pytest.importorskip("avmp.engine.loop")
    from benchmarks.serve import stop, wait_healthy

    port = free_port()
    command = [sys.executable, "-c", "import sys; from avmp.cli import main; sys.exit(main())",
               "serve", "granite-4.0-h-micro", "--random-weights", "--scale", "tiny",
               "--memory", "256MiB", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"arrival_s": 0, "prompt_tokens": 16 + i, "output_tokens": 8}) + "\n"
        for i in range(12)
    ))  # fmt: skip
    out = tmp_path / "r.json"
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, timeout_s=120)
            args = ["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--trace", str(trace),
                    "--request-rate", "50", "--max-concurrency", "6", "--request-timeout", "60",
                    "--out", str(out), "--no-progress"]  # fmt: skip
            assert main(args) == 0
        finally:
            assert stop(server) == 0
    summary = json.loads(out.read_text())["results"][0]["summary"]
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_tokens"] == 96 and summary["usage_reported"]
    assert summary["input_tokens"] == sum(16 + i for i in range(12))


@pytest.mark.slow
def test_multi_turn_against_avmp_serve_and_its_prefix_cache(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ShareGPT conversations through the real server's chat endpoint (the demo
    tokenizer's mistral-common encoding): every turn is answered, the server counts each
    later prompt longer than the one before and its answer together, and its prefix cache
    serves part of them (the histories it received open with what it had computed)."""
    import subprocess

    import httpx

    pytest.importorskip("avmp.engine.loop")
    from benchmarks.serve import stop, wait_healthy

    monkeypatch.setattr(
        loadgen,
        "sharegpt_conversations",
        functools.partial(loadgen.sharegpt_conversations, limit=400),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "import sys; from avmp.cli import main; sys.exit(main())",
               "serve", "granite-4.0-h-micro", "--random-weights", "--scale", "tiny",
               "--memory", "256MiB", "--prefix-cache", "avmp", "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    out = tmp_path / "mt.json"
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            wait_healthy(url, server, timeout_s=120)
            args = ["bench", "serve", "--url", url, "--multi-turn", "--num-prompts", "3",
                    "--num-turns", "3", "--sharegpt-output-len", "6", "--max-concurrency", "2",
                    "--request-timeout", "60", "--max-duration", "120", "--out", str(out),
                    "--no-progress"]  # fmt: skip
            assert main(args) == 0
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            assert stop(server) == 0
    (entry,) = json.loads(out.read_text())["results"]
    summary = entry["summary"]
    assert summary["failed"] == 0 and summary["usage_reported"]
    assert summary["turns"]["conversations_completed"] == 3
    assert summary["completed"] == sum(t["completed"] for t in summary["turns"]["by_turn"])
    records = entry["requests"]
    assert any(r["turn"] for r in records)
    for conversation in range(3):
        sent = sorted((r for r in records if r["conversation"] == conversation),
                      key=lambda r: r["turn"])  # fmt: skip
        assert [r["turn"] for r in sent] == list(range(sent[0]["conversation_turns"]))
        assert all(r["output_tokens"] == 6 for r in sent)
        for before, after in zip(sent, sent[1:], strict=False):
            # the previous prompt, then (mistral-common's v1 format) the answer, </s>,
            # [INST], the next message and [/INST]
            assert after["prompt_tokens"] > before["prompt_tokens"] + 3
    hits = [
        line for line in metrics.splitlines() if line.startswith("avmp_prefix_cache_hit_tokens")
    ]
    assert hits and float(hits[0].split()[-1]) > 0
