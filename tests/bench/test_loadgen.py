from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import MODEL, FakeBehaviour, fake_server

from avmp.bench import loadgen
from avmp.bench.loadgen import (
    BenchError,
    BenchRequest,
    Goodput,
    LoadConfig,
    RequestRecord,
    arrival_times,
    parse_goodput,
    run_load,
    summarize,
)


def _requests(n: int, max_tokens: int = 10, prompt_tokens: int = 5) -> list[BenchRequest]:
    return loadgen.length_requests([prompt_tokens] * n, [max_tokens] * n, seed=0)


# -- arrival schedules ----------------------------------------------------------------


def test_poisson_schedule_has_the_rate_and_exponential_gaps() -> None:
    times = arrival_times(4000, rate=20.0, burstiness=1.0, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20 * 4  # mean within 4 standard errors
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.06  # exponential: cv 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_schedule_keeps_the_rate_with_cv_one_over_root_k(burstiness: float) -> None:
    gaps = np.diff(arrival_times(8000, rate=10.0, burstiness=burstiness, seed=1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_schedules_are_deterministic_by_seed_and_infinite_rate_is_one_burst() -> None:
    first = arrival_times(50, 5.0, 1.0, seed=7)
    assert np.array_equal(first, arrival_times(50, 5.0, 1.0, seed=7))
    assert not np.array_equal(first, arrival_times(50, 5.0, 1.0, seed=8))
    assert np.array_equal(arrival_times(5, math.inf, 1.0, seed=0), np.zeros(5))


# -- requests -------------------------------------------------------------------------


def test_length_requests_are_token_ids_of_exact_length_by_seed() -> None:
    built = loadgen.length_requests([3, 40], [7, 9], seed=2)
    assert [len(r.prompt) for r in built] == [3, 40]
    assert [(r.prompt_tokens, r.max_tokens) for r in built] == [(3, 7), (40, 9)]
    low, high = loadgen.PROMPT_TOKEN_IDS
    assert all(low <= t < high for r in built for t in r.prompt)  # type: ignore[union-attr]
    assert loadgen.length_requests([3, 40], [7, 9], seed=2) == built


def test_trace_and_preset_requests(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"arrival_s": i, "prompt_tokens": 10 + i, "output_tokens": 3} for i in range(4)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = loadgen.trace_requests(trace, num_prompts=3, seed=0)
    assert [len(r.prompt) for r in built] == [10, 11, 12]
    assert [r.arrival_s for r in built] == [0, 1, 2]
    preset = loadgen.preset_requests("uniform_short", num_prompts=5, seed=0)
    assert len(preset) == 5 and all(128 <= r.prompt_tokens <= 1024 for r in preset)
    assert all(len(r.prompt) == r.prompt_tokens for r in preset)


def test_content_prompts_send_the_same_ids_for_the_same_content() -> None:
    from avmp.sched.request import RequestSpec

    specs = [
        RequestSpec(0, 0.0, 30, 4, (("system", 20), ("q0", 10)), output_segment="a0"),
        RequestSpec(1, 1.0, 12, 2),
        RequestSpec(2, 2.0, 38, 4, (("system", 20), ("q0", 10), ("a0", 4), ("q1", 4))),
        RequestSpec(3, 3.0, 33, 1, (("system", 25), ("q2", 8))),  # a longer system prompt
        RequestSpec(4, 4.0, 12, 3, (("system", 12),)),
    ]
    first, plain, turn, longer, shorter = loadgen.content_prompts(specs, seed=5)
    assert [len(p) for p in (first, plain, turn, longer, shorter)] == [30, 12, 38, 33, 12]
    assert turn[:30] == first  # the conversation so far, then the answer's ids and q1
    assert longer[:20] == first[:20] and longer[20:25] != first[20:25]
    assert shorter == first[:12]
    low, high = loadgen.PROMPT_TOKEN_IDS
    assert all(low <= t < high for p in (first, plain, turn) for t in p)
    assert loadgen.content_prompts(specs, seed=5) == [first, plain, turn, longer, shorter]
    assert loadgen.content_prompts(specs, seed=6)[0] != first
    # a trace that names no content gets length_requests' prompts, as before
    unnamed = [RequestSpec(i, float(i), 5 + i, 2) for i in range(4)]
    by_length = loadgen.length_requests([5, 6, 7, 8], [2] * 4, seed=5)
    assert loadgen.content_prompts(unnamed, seed=5) == [r.prompt for r in by_length]


def test_sharegpt_requests_are_the_conversations_of_the_sampled_lengths() -> None:
    from avmp.bench import sharegpt

    built = loadgen.sharegpt_requests(12, seed=0, limit=400)
    prompts, outputs = sharegpt.sample_lengths(12, seed=0, rules="vllm", limit=400)
    assert [r.prompt_tokens for r in built] == prompts.tolist()
    assert [r.max_tokens for r in built] == outputs.tolist()
    assert all(sharegpt.count_tokens(r.prompt) == r.prompt_tokens for r in built)  # type: ignore[arg-type]


# -- against the fake server ----------------------------------------------------------


def test_measured_latencies_match_the_fake_servers_timing() -> None:
    behaviour = FakeBehaviour(first_token_s=0.1, token_gap_s=0.02)
    with fake_server(behaviour) as (url, state):
        config = LoadConfig(url, MODEL, max_concurrency=4)
        records, duration = run_load(_requests(8), config)
    summary = summarize(records, duration)
    assert summary["completed"] == 8 and summary["failed"] == 0 and summary["usage_reported"]
    assert summary["output_tokens"] == 80 and summary["input_tokens"] == 40
    # sleeps only ever run long: lower bounds are exact, upper bounds leave room for a
    # busy machine
    assert 100 <= summary["ttft_ms"]["median"] < 180
    assert 20 <= summary["itl_ms"]["median"] < 35
    assert 20 <= summary["tpot_ms"]["median"] < 35
    e2e = 100 + 9 * 20
    assert e2e <= summary["e2e_ms"]["median"] < e2e + 120
    assert len(loadgen.metric_values_ms(records, "itl")) == 8 * 9
    # two waves of four under the cap
    assert 2 * e2e / 1e3 <= duration < 2 * e2e / 1e3 + 0.4
    assert summary["output_token_throughput"] == pytest.approx(80 / duration)
    assert state.max_in_flight == 4
    body = state.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["model"] == MODEL and len(body["prompt"]) == 5


def test_rate_spreads_requests_and_chat_endpoint_reads_deltas() -> None:
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.0)) as (url, state):
        config = LoadConfig(url, MODEL, endpoint="chat", request_rate=20.0, ignore_eos=False)
        records, duration = run_load(_requests(10, max_tokens=3), config)
    starts = [r.start_s for r in records]
    expected = arrival_times(10, 20.0, 1.0, seed=0)
    assert np.all(np.array(starts) >= expected - 1e-3)
    assert np.all(np.array(starts) < expected + 0.15)
    assert all(r.success and r.output_tokens == 3 for r in records)
    assert "messages" in state.bodies[0] and "ignore_eos" not in state.bodies[0]


def test_the_trace_timing_sends_each_request_at_its_scaled_arrival() -> None:
    arrivals = [0.0, 2.0, 2.0, 5.0, 9.0]
    requests = [replace(r, arrival_s=a) for r, a in zip(_requests(5, 2), arrivals, strict=True)]
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.0)) as (url, _):
        # a rate and burstiness are not read under a time scale
        config = LoadConfig(url, MODEL, request_rate=1.0, burstiness=0.1, time_scale=0.04)
        records, duration = run_load(requests, config)
    starts = np.array([r.start_s for r in records])
    expected = np.array(arrivals) * 0.04
    assert np.array_equal(loadgen.send_times(requests, config), expected)
    assert np.all(starts >= expected - 1e-3) and np.all(starts < expected + 0.15)
    assert all(r.success for r in records) and 0.36 <= duration < 1.0
    with pytest.raises(ValueError, match="the trace's own timing needs requests read from"):
        run_load(_requests(2), config)


def test_without_usage_tokens_are_counted_from_chunks() -> None:
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.0, send_usage=False)) as (
        url,
        _,
    ):
        records, _ = run_load(_requests(3, max_tokens=6), LoadConfig(url, MODEL))
    assert all(r.success and r.output_tokens == 6 and not r.usage_reported for r in records)
    assert not summarize(records, 1.0)["usage_reported"]


def test_failed_requests_are_counted_with_their_errors() -> None:
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.0, fail_every=3)) as (
        url,
        _,
    ):
        records, duration = run_load(_requests(9, max_tokens=2), LoadConfig(url, MODEL))
    summary = summarize(records, duration)
    assert summary["completed"] == 6 and summary["failed"] == 3
    assert summary["errors"] == [{"message": "HTTP 500: fake failure", "count": 3}]


@pytest.mark.parametrize(
    "error_body",
    [
        {"error": "Input validation error: max_new_tokens", "error_type": "validation"},  # TGI
        {"object": "error", "message": "Input validation error: max_new_tokens", "code": 400},
    ],
)
def test_error_bodies_of_tgi_and_sglang_give_their_message(error_body: dict) -> None:
    behaviour = FakeBehaviour(fail_every=1, error_body=error_body)
    with fake_server(behaviour) as (url, _):
        records, _ = run_load(_requests(1), LoadConfig(url, MODEL))
    assert records[0].error == "HTTP 500: Input validation error: max_new_tokens"


def test_an_error_event_in_tgis_shape_fails_the_request_without_crashing() -> None:
    # TGI streams its error as a string, not OpenAI's object with a message
    stream = (
        'data:{"choices":[{"index":0,"text":" a","finish_reason":null}]}\n\n',
        'data:{"error":"Request failed during generation: OOM","error_type":"generation"}\n\n',
    )
    with fake_server(FakeBehaviour(raw_stream=stream)) as (url, _):
        records, _ = run_load(_requests(2), LoadConfig(url, MODEL, request_timeout_s=5.0))
    errors = [r.error for r in records if not r.success]
    assert errors == ["stream error: Request failed during generation: OOM"] * 2


def test_an_error_line_of_llama_cpp_fails_the_request() -> None:
    # llama.cpp's server sends an error as an `error:` line, not as `data:`, then ends
    stream = (
        'data: {"choices":[{"index":0,"text":" a","finish_reason":null}]}\n\n',
        'error: {"code":500,"message":"the request exceeds the context size","type":"server_error"}'
        "\n\n",
    )
    with fake_server(FakeBehaviour(raw_stream=stream)) as (url, _):
        records, duration = run_load(_requests(2), LoadConfig(url, MODEL, request_timeout_s=5.0))
    assert summarize(records, duration)["errors"] == [
        {"message": "stream error: the request exceeds the context size", "count": 2}
    ]


@pytest.mark.parametrize(
    "stream",
    [
        ("data: [DONE]\n\n",),
        (  # a role chunk and an answer that ends at once
            'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
            'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
            "data: [DONE]\n\n",
        ),
    ],
)
def test_a_stream_without_text_is_a_failure_not_a_zero_latency_success(
    stream: tuple[str, ...],
) -> None:
    with fake_server(FakeBehaviour(raw_stream=stream)) as (url, _):
        config = LoadConfig(url, MODEL, endpoint="chat", request_timeout_s=5.0)
        records, duration = run_load([BenchRequest("hi", 1, 4)] * 2, config)
    summary = summarize(records, duration, goodput=Goodput(ttft_ms=1000.0))
    assert summary["completed"] == 0 and summary["goodput"] == 0.0
    assert summary["errors"] == [{"message": "the stream carried no text", "count": 2}]


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("[1, 2]", "not a JSON object: [1, 2]"),
        ('{"choices": [null]}', "not a chunk"),
        ('{"choices": [], "usage": {"completion_tokens": null}}', "not a chunk"),
    ],
)
def test_an_event_that_is_not_a_chunk_fails_the_request_without_crashing(
    event: str, message: str
) -> None:
    stream = (
        'data: {"choices":[{"index":0,"text":" a","finish_reason":null}]}\n\n',
        f"data: {event}\n\n",
        "data: [DONE]\n\n",
    )
    with fake_server(FakeBehaviour(raw_stream=stream)) as (url, _):
        records, _ = run_load(_requests(2), LoadConfig(url, MODEL, request_timeout_s=5.0))
    for record in records:
        assert not record.success and record.error.startswith("malformed stream event: ")
        assert message in record.error


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_a_reasoning_models_thinking_is_its_first_tokens(field: str) -> None:
    # vLLM streams thinking as `reasoning` (it dropped `reasoning_content`), SGLang as
    # `reasoning_content`: the first token is the thinking's, not the answer's
    def chunk(delta: dict) -> str:
        return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n"

    stream = (
        chunk({"role": "assistant", "content": ""}),
        chunk({field: "Let me"}),
        chunk({field: " think."}),
        chunk({"content": "Yes."}),
        "data: [DONE]\n\n",
    )
    with fake_server(FakeBehaviour(raw_stream=stream)) as (url, state):
        config = LoadConfig(url, MODEL, endpoint="chat", request_timeout_s=5.0)
        records, _ = loadgen.run_conversations(
            [loadgen.Conversation(("hi", "more"), (1, 1), (4, 4))], config
        )
    assert all(r.success and len(r.chunk_s) == 3 and r.output_tokens == 3 for r in records)
    # the history sent back holds the answer, not the thinking
    assert state.bodies[1]["messages"][1] == {"role": "assistant", "content": "Yes."}


def test_request_timeout_and_run_bound_fail_requests_without_crashing() -> None:
    with fake_server(FakeBehaviour(first_token_s=2.0)) as (url, _):
        timed_out, _ = run_load(_requests(2), LoadConfig(url, MODEL, request_timeout_s=0.2))
        bounded, duration = run_load(_requests(2), LoadConfig(url, MODEL, max_duration_s=0.3))
    assert all(not r.success and r.error == "timed out after 0.2 s" for r in timed_out)
    # chunks arrive well within httpx's read timeout, the whole request does not
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.05)) as (url, _):
        slow, _ = run_load(
            _requests(1, max_tokens=40), LoadConfig(url, MODEL, request_timeout_s=0.5)
        )
    assert not slow[0].success and slow[0].error == "timed out after 0.5 s"
    assert 5 <= len(slow[0].chunk_s) <= 11
    assert all(not r.success and "unfinished at the 0.3 s bound" in r.error for r in bounded)
    assert duration < 1.0


def test_unreachable_server_and_model_discovery() -> None:
    with fake_server() as (url, _):
        assert loadgen.fetch_model(url + "/v1/") == MODEL
        with pytest.raises(BenchError, match="every warm-up request failed; the first: HTTP 404"):
            loadgen.warm_up(_requests(1), LoadConfig(url + "/nowhere", MODEL))
    with pytest.raises(ConnectionError, match="cannot reach"):
        loadgen.fetch_model(url)


# -- arithmetic on hand-built records -------------------------------------------------


def _record(ttft: float, latency: float, tokens: int, success: bool = True) -> RequestRecord:
    gap = (latency - ttft) / max(tokens - 1, 1)
    chunks = [ttft + i * gap for i in range(tokens)]
    return RequestRecord(
        0,
        10,
        tokens,
        success=success,
        latency_s=latency,
        chunk_s=chunks,
        output_tokens=tokens,
        error=None if success else "x",
    )


def test_goodput_counts_requests_meeting_every_objective() -> None:
    records = [
        _record(0.1, 1.1, 11),  # ttft 100 ms, tpot 100 ms
        _record(0.3, 0.8, 11),  # ttft 300 ms, tpot 50 ms
        _record(0.1, 0.6, 11),  # ttft 100 ms, tpot 50 ms
        _record(0.1, 0.1, 1),  # one token: no tpot, meets that objective
        _record(0.01, 0.1, 5, success=False),
    ]
    goodput = parse_goodput(["ttft:200", "tpot:60"])
    assert goodput == Goodput(ttft_ms=200, tpot_ms=60)
    assert summarize(records, 2.0, goodput=goodput)["goodput"] == pytest.approx(2 / 2.0)
    assert summarize(records, 2.0, goodput=parse_goodput(["e2e:700"]))["goodput"] == 1.0
    assert summarize(records, 2.0)["goodput"] is None
    assert records[0].tpot_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    "items", [["ttft"], ["ttft:x"], ["ttft:-1"], ["speed:3"], ["ttft:1", "ttft:2"], ["tpot:inf"]]
)
def test_bad_goodput_objectives_are_refused(items: list[str]) -> None:
    with pytest.raises(ValueError, match="goodput objective"):
        parse_goodput(items)


def test_percentiles_and_throughput_arithmetic() -> None:
    records = [_record(t / 1e3, 1.0, 2) for t in range(1, 101)]
    summary = summarize(records, 4.0, percentiles=(50, 99.9))
    assert summary["ttft_ms"]["p50"] == pytest.approx(50.5)
    assert summary["ttft_ms"]["p99.9"] == pytest.approx(np.percentile(np.arange(1, 101), 99.9))
    assert summary["request_throughput"] == 25.0 and summary["input_token_throughput"] == 250.0
    empty = summarize([_record(0.1, 0.2, 2, success=False)], 1.0)
    assert empty["completed"] == 0 and math.isnan(empty["ttft_ms"]["mean"])


def test_saved_result_round_trips(tmp_path: Path) -> None:
    records = [_record(0.1, 0.5, 5), _record(0.2, 0.2, 1, success=False)]
    config = LoadConfig("http://localhost:1", MODEL, request_rate=4.0)
    entry = loadgen.rate_result(config, records, 2.0, (50, 99), Goodput(ttft_ms=150))
    result = {"schema": loadgen.RESULT_SCHEMA, "results": [entry]}
    path = tmp_path / "r.json"
    loadgen.save_result(path, result)
    loaded = loadgen.load_result(path)
    again = loadgen.records_of(loaded["results"][0])
    assert again == records
    assert loaded["results"][0]["request_rate"] == "4"
    resummarized = summarize(again, 2.0, (50, 99), Goodput(ttft_ms=150))
    assert loaded["results"][0]["summary"]["ttft_ms"] == resummarized["ttft_ms"]
    assert loaded["results"][0]["summary"]["goodput"] == 0.5
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not an avmp bench serve result"):
        loadgen.load_result(tmp_path / "other.json")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "localhost:8000"}, "bad server URL"),
        ({"base_url": "http://h:99999"}, "port"),
        ({"endpoint": "embeddings"}, "unknown endpoint"),
        ({"request_rate": 0.0}, "request rate"),
        ({"burstiness": -1.0}, "burstiness"),
        ({"time_scale": 0.0}, "time scale must be a positive number"),
        ({"time_scale": math.inf}, "time scale must be a positive number"),
        ({"max_concurrency": 0}, "concurrency"),
    ],
)
def test_load_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadConfig(**{"base_url": "http://127.0.0.1:8000", "model": "m", **kwargs})


def test_base_url_drops_v1() -> None:
    assert LoadConfig("http://h:8/v1/", "m").base_url == "http://h:8"


def word_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer of 200 words (w0 .. w199) plus [UNK], saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(200)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_text_prompts_have_the_lengths_under_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = loadgen.load_tokenizer(str(word_tokenizer(tmp_path / "tok")))
    built = loadgen.length_requests([5, 30], [4, 2], seed=0, tokenizer=tokenizer)
    assert all(isinstance(r.prompt, str) for r in built)
    assert [r.prompt_tokens for r in built] == [5, 30]
    assert [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in built] == [5, 30]
    ids = tokenizer.encode(built[1].prompt, add_special_tokens=False)
    assert min(ids) >= 100 and max(ids) <= 200  # within this small vocabulary
    with pytest.raises(OSError):
        loadgen.load_tokenizer(str(tmp_path / "none"))


def test_sse_lines_split_at_the_specs_line_ends_only() -> None:
    # U+2028, U+0085 and U+001C inside an event are text, not line ends (str.splitlines
    # and httpx's aiter_lines would cut the event there); a CR LF may straddle two reads
    from avmp.bench.loadgen import sse_lines

    async def collect(parts: list[bytes]) -> list[str]:
        async def chunks():
            for part in parts:
                yield part

        return [line async for line in sse_lines(chunks())]

    stream = 'data: {"t":"a\u2028b\x85c\x1cd"}\r\n\r\ndata: [DONE]\n\n'.encode()
    expected = ['data: {"t":"a\u2028b\x85c\x1cd"}', "", "data: [DONE]", ""]
    for cut in range(1, len(stream)):
        assert asyncio.run(collect([stream[:cut], stream[cut:]])) == expected
    assert asyncio.run(collect([b"a\rb\r", b"\nc"])) == ["a", "b", "c"]


# -- vLLM's random dataset --------------------------------------------------------------


def test_random_lengths_are_uniform_on_vllms_bounds() -> None:
    lengths = loadgen.RandomLengths(input_len=100, output_len=10, range_ratio=0.25)
    assert lengths.input_bounds() == (75, 125) and lengths.output_bounds() == (7, 13)
    inputs, outputs = lengths.sample(4000, np.random.default_rng(0))
    assert (min(inputs), max(inputs)) == (75, 125) and (min(outputs), max(outputs)) == (7, 13)
    assert np.mean(inputs) == pytest.approx(100, abs=1.0)
    exact = loadgen.RandomLengths(input_len=33, output_len=5)
    assert exact.sample(3, np.random.default_rng(0)) == ([33, 33, 33], [5, 5, 5])
    # an output is never shorter than one token; ceil and floor as vLLM rounds
    assert loadgen.RandomLengths(10, 1, 0.5).output_bounds() == (1, 2)
    assert loadgen.RandomLengths(7, 3, 0.5).input_bounds() == (3, 11)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"range_ratio": 1.0}, r"range ratio must be in \[0, 1\)"),
        ({"range_ratio": -0.1}, "range ratio"),
        ({"output_len": 0}, "output length must be >= 1"),
        ({"input_len": -1}, "must be >= 0"),
        ({"input_len": 1, "range_ratio": 0.5}, "the shortest prompt would have no token"),
    ],
)
def test_random_lengths_refuse_what_vllm_refuses(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loadgen.RandomLengths(**{"input_len": 8, "output_len": 4, **kwargs})


def test_random_requests_share_the_prefix_and_have_the_drawn_lengths() -> None:
    lengths = loadgen.RandomLengths(input_len=20, output_len=6, range_ratio=0.5, prefix_len=7)
    built = loadgen.random_requests(lengths, 50, seed=3)
    prefix = built[0].prompt[:7]
    assert all(r.prompt[:7] == prefix for r in built)
    assert all(len(r.prompt) == r.prompt_tokens for r in built)
    assert {r.prompt_tokens - 7 for r in built} <= set(range(10, 31))
    outputs = {r.max_tokens for r in built}
    assert outputs <= set(range(3, 10)) and len(outputs) > 3
    assert built[0].prompt[7:] != built[1].prompt[7:]
    low, high = loadgen.PROMPT_TOKEN_IDS
    assert all(low <= t < high for r in built for t in r.prompt)  # type: ignore[union-attr]
    assert loadgen.random_requests(lengths, 50, seed=3) == built
    assert loadgen.random_requests(lengths, 50, seed=4) != built
    # no prefix, no spread: exactly the length asked
    plain = loadgen.random_requests(loadgen.RandomLengths(12, 3), 4, seed=0)
    assert [(len(r.prompt), r.max_tokens) for r in plain] == [(12, 3)] * 4


def test_random_requests_as_text_under_a_tokenizer(tmp_path: Path) -> None:
    tokenizer = loadgen.load_tokenizer(str(word_tokenizer(tmp_path / "tok")))
    lengths = loadgen.RandomLengths(input_len=10, output_len=2, range_ratio=0.3, prefix_len=5)
    built = loadgen.random_requests(lengths, 6, seed=0, tokenizer=tokenizer)
    assert all(isinstance(r.prompt, str) for r in built)
    counts = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in built]
    assert counts == [r.prompt_tokens for r in built] and all(12 <= n <= 18 for n in counts)
    assert len({" ".join(r.prompt.split()[:5]) for r in built}) == 1  # type: ignore[union-attr]


# -- conversations ----------------------------------------------------------------------


def _conversations(num: int, num_turns: int, max_tokens: int = 3) -> list[loadgen.Conversation]:
    return [
        loadgen.Conversation(
            tuple(f"c{c} message {t}" for t in range(num_turns)),
            (3,) * num_turns,
            (max_tokens,) * num_turns,
        )
        for c in range(num)
    ]


def _bodies_by_conversation(bodies: list[dict]) -> dict[str, list[int]]:
    """Body indices of each conversation (named by its first message), in arrival order."""
    by_first: dict[str, list[int]] = {}
    for i, body in enumerate(bodies):
        by_first.setdefault(body["messages"][0]["content"], []).append(i)
    return by_first


def test_each_turn_carries_the_servers_own_earlier_answers() -> None:
    conversations = _conversations(num=3, num_turns=3)
    behaviour = FakeBehaviour(first_token_s=0.02, token_gap_s=0.005)
    with fake_server(behaviour) as (url, state):
        config = LoadConfig(url, MODEL, endpoint="chat", max_concurrency=2, think_time_s=0.05)
        records, duration = loadgen.run_conversations(conversations, config)
    assert len(records) == len(state.bodies) == 9 and all(r.success for r in records)
    assert state.max_in_flight <= 2
    by_first = _bodies_by_conversation(state.bodies)
    assert len(by_first) == 3
    for indices in by_first.values():
        for turn, i in enumerate(indices):
            messages = state.bodies[i]["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * turn + ["user"]
            name = messages[0]["content"].split()[0]
            sent = [m["content"] for m in messages if m["role"] == "user"]
            assert sent == [f"{name} message {t}" for t in range(turn + 1)]
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            assert answers == [state.answers[j] for j in indices[:turn]]  # the server's own words
    # a turn leaves only after the previous answer ended and the think time passed
    for c in range(3):
        sent = sorted((r for r in records if r.conversation == c), key=lambda r: r.turn)
        assert [(r.turn, r.conversation_turns) for r in sent] == [(0, 3), (1, 3), (2, 3)]
        for before, after in zip(sent, sent[1:], strict=False):
            assert after.start_s >= before.start_s + before.latency_s + 0.05 - 1e-3
    turns = summarize(records, duration)["turns"]
    assert turns["conversations"] == turns["conversations_completed"] == 3
    assert [(t["turn"], t["completed"], t["failed"]) for t in turns["by_turn"]] == [
        (0, 3, 0), (1, 3, 0), (2, 3, 0)
    ]  # fmt: skip
    assert turns["ttft_first_turn_ms"]["median"] >= 20
    assert turns["ttft_later_turns_ms"]["mean"] >= 20


def test_conversations_start_at_the_rate_and_single_turn_summaries_have_no_turns() -> None:
    with fake_server(FakeBehaviour(first_token_s=0.0, token_gap_s=0.0)) as (url, _):
        config = LoadConfig(url, MODEL, endpoint="chat", request_rate=20.0)
        records, _ = loadgen.run_conversations(_conversations(6, 2, max_tokens=1), config)
        single, duration = run_load(_requests(2), LoadConfig(url, MODEL))
    starts = np.array(sorted(r.start_s for r in records if r.turn == 0))
    expected = arrival_times(6, 20.0, 1.0, seed=0)
    assert np.all(starts >= expected - 1e-3) and np.all(starts < expected + 0.15)
    assert summarize(single, duration)["turns"] is None


def test_a_failed_turn_ends_its_conversation_and_is_counted() -> None:
    behaviour = FakeBehaviour(first_token_s=0.0, token_gap_s=0.0, fail_every=5)
    with fake_server(behaviour) as (url, state):
        config = LoadConfig(url, MODEL, endpoint="chat", max_concurrency=1)
        records, duration = loadgen.run_conversations(_conversations(3, 3), config)
    # one conversation at a time: the fifth body, the second conversation's second turn,
    # fails, and that conversation sends no third
    assert len(records) == len(state.bodies) == 3 + 2 + 3
    assert [(r.conversation, r.turn) for r in records if not r.success] == [(1, 1)]
    assert [r.conversation for r in records] == [0, 0, 0, 1, 1, 2, 2, 2]
    summary = summarize(records, duration)
    assert summary["failed"] == 1 and summary["errors"][0]["message"] == "HTTP 500: fake failure"
    assert summary["turns"]["conversations"] == 3
    assert summary["turns"]["conversations_completed"] == 2
    assert [t["failed"] for t in summary["turns"]["by_turn"]] == [0, 1, 0]


def test_the_run_bound_cuts_conversations_without_crashing() -> None:
    with fake_server(FakeBehaviour(first_token_s=0.15, token_gap_s=0.0)) as (url, state):
        config = LoadConfig(url, MODEL, endpoint="chat", max_duration_s=0.4)
        records, duration = loadgen.run_conversations(_conversations(2, 10, 1), config)
    assert duration < 1.0 and 2 <= len(records) < 20
    cut = [r for r in records if not r.success]
    assert len(cut) == 2 and all("unfinished at the 0.4 s bound" in r.error for r in cut)
    assert len(state.bodies) == len(records)  # no turn sent after the bound


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": "completions"}, "endpoint chat"),
        ({"time_scale": 1.0}, "a trace's timing does not apply"),
    ],
)
def test_conversations_refuse_what_they_cannot_send(kwargs: dict, message: str) -> None:
    config = LoadConfig("http://127.0.0.1:1", MODEL, **{"endpoint": "chat", **kwargs})
    with pytest.raises(ValueError, match=message):
        loadgen.run_conversations(_conversations(1, 1), config)


def test_sharegpt_conversations_are_the_human_turns_within_the_context_bound() -> None:
    from avmp.bench import sharegpt

    built = loadgen.sharegpt_conversations(8, seed=1, limit=400)
    texts = sharegpt.read_conversations(400).turns
    for conversation in built:
        (index,) = [i for i, t in enumerate(texts) if t and t[0][1] == conversation.messages[0]]
        humans = [text for speaker, text in texts[index][::2]]
        assert list(conversation.messages) == humans[: conversation.num_turns]
        assert [sharegpt.count_tokens(m) for m in conversation.messages] == list(
            conversation.message_tokens
        )
        context = sum(conversation.message_tokens) + sum(conversation.max_tokens)
        assert context <= loadgen.SHAREGPT_MAX_CONTEXT_TOKENS
    assert any(c.num_turns > 1 for c in built)
    assert loadgen.sharegpt_conversations(8, seed=1, limit=400) == built
    cut = loadgen.sharegpt_conversations(8, seed=1, max_turns=1, output_len=5, limit=400)
    assert all(c.num_turns == 1 and c.max_tokens == (5,) for c in cut)
    assert [c.messages[0] for c in cut][:3] == [c.messages[0] for c in built][:3]


def test_synthetic_conversations_have_the_lengths_and_open_with_the_prefix(
    tmp_path: Path,
) -> None:
    tokenizer = loadgen.load_tokenizer(str(word_tokenizer(tmp_path / "tok")))
    lengths = loadgen.RandomLengths(input_len=6, output_len=4, prefix_len=5)
    built = loadgen.synthetic_conversations(lengths, 3, num_turns=4, seed=0, tokenizer=tokenizer)
    assert [c.num_turns for c in built] == [4, 4, 4]
    for conversation in built:
        counts = [len(tokenizer.encode(m, add_special_tokens=False)) for m in conversation.messages]
        assert counts == list(conversation.message_tokens) == [11, 6, 6, 6]
        assert conversation.max_tokens == (4, 4, 4, 4)
    assert all(c.messages[0].split()[:5] == built[0].messages[0].split()[:5] for c in built)
    assert built[0].messages[0].split()[5:] != built[1].messages[0].split()[5:]
    assert built[0].messages[1] != built[1].messages[1]
    with pytest.raises(ValueError, match="a later turn's message could have no token"):
        empty_later = loadgen.RandomLengths(0, 4, prefix_len=3)
        loadgen.synthetic_conversations(empty_later, 1, 2, 0, tokenizer)
