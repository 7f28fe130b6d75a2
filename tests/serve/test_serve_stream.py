"""Clients that leave: a stream closed mid-way or a non-streamed request whose client
hangs up is aborted, and its memory is back in the allocator at the next step; a stream
one of whose choices is refused is answered at once."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from serve_helpers import (
    MODEL_NAME,
    CharTokenizer,
    HermesChat,
    ScriptedLoop,
    make_app,
    make_engine,
    serving,
    wait_until,
)

pytest.importorskip("fastapi")

LONG = {"model": MODEL_NAME, "prompt": "w1 w2 w3", "max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(checkpoints):
    with serving(make_app(make_engine(checkpoints["chat"]))) as running:
        yield running


def _idle(server) -> bool:
    snap = server.loop.snapshot()
    usage = snap.usage
    return (
        snap.num_running == 0 and snap.num_waiting == 0 and usage.num_requests == 0
        and usage.kv_used_bytes == 0 and usage.state_used_bytes == 0
    )  # fmt: skip


def _finished(http: httpx.Client, reason: str) -> float:
    """The finished-requests counter of ``reason``."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(http.get("/metrics").text)
    return sum(
        sample.value for family in families for sample in family.samples
        if sample.name == "avmp_requests_finished_total"
        and sample.labels["finish_reason"] == reason
    )  # fmt: skip


def test_a_stream_closed_mid_way_is_aborted_and_frees_its_memory(server):
    streamed = {**LONG, "stream": True}
    with server.client() as http:
        aborted, ended = _finished(http, "abort"), _finished(http, "length")
    with server.client() as http, http.stream("POST", "/v1/completions", json=streamed) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 3:
                break
        assert server.loop.snapshot().usage.num_requests == 1  # still running
    # the connection is closed: the request is aborted at the next step
    assert wait_until(lambda: _idle(server)), server.loop.snapshot()
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    with server.client() as http:  # and the server goes on
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
        # counted as ended: the stream its client left as abort, the next by its length
        assert wait_until(lambda: _finished(http, "abort") == aborted + 1)
        assert _finished(http, "length") == ended + 1


def test_a_client_that_hangs_up_before_its_answer_is_aborted(server):
    before = server.loop.snapshot().totals.num_generated_tokens
    with server.client() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={**LONG, "max_tokens": 250}, timeout=0.5)
    assert wait_until(lambda: _idle(server)), server.loop.snapshot()
    generated = server.loop.snapshot().totals.num_generated_tokens - before
    assert 0 < generated < 250  # it started, and did not run to its end


def test_the_finish_chunk_and_done_end_every_stream(server):
    with server.client() as http:
        response = http.post("/v1/completions", json={**LONG, "max_tokens": 4, "stream": True})
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    assert response.headers["content-type"].startswith("text/event-stream")


class _QueuedLoop(ScriptedLoop):
    """A stand-in loop whose requests wait for their first update forever (a long queue);
    ``closed`` is set once one's generator is closed, which aborts an engine request."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()

    async def generate(self, prompt: list[int], options: Any) -> Any:
        try:
            await asyncio.Event().wait()
            yield
        finally:
            self.closed.set()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/responses"])
def test_a_stream_whose_client_leaves_while_it_waits_is_aborted(route):
    from avmp.serve.app import ServeConfig, create_app

    loop = _QueuedLoop()
    app = create_app(loop, CharTokenizer(), ServeConfig(model_name=MODEL_NAME), HermesChat())
    body = {"model": MODEL_NAME, "prompt": "w1", "input": "w1", "stream": True}
    body.pop("input" if route == "/v1/completions" else "prompt")
    with serving(app) as server, server.client() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(route, json=body, timeout=0.5)
        # no first token yet: leaving before it aborts the request all the same
        assert loop.closed.wait(10)
    counter = app.state.server.metrics.finished  # the stand-in loop has no /metrics
    aborted = [s.value for f in counter.collect() for s in f.samples
               if s.name.endswith("_total") and s.labels["finish_reason"] == "abort"]  # fmt: skip
    assert aborted == [1]


class _FullAfterOneLoop(_QueuedLoop):
    """A stand-in loop whose first request waits in the queue forever and whose later
    ones find it full."""

    def __init__(self) -> None:
        super().__init__()
        self.num_requests = 0

    async def generate(self, prompt: list[int], options: Any) -> Any:
        from avmp.engine.loop import QueueFull

        self.num_requests += 1
        if self.num_requests > 1:
            raise QueueFull("1 request is waiting (at most 1)", 2.0)
        async for update in super().generate(prompt, options):
            yield update


@pytest.mark.parametrize("stream", [True, False])
def test_a_choice_refused_answers_at_once_and_aborts_the_others(stream):
    from avmp.serve.app import ServeConfig, create_app

    loop = _FullAfterOneLoop()
    app = create_app(loop, CharTokenizer(), ServeConfig(model_name=MODEL_NAME), HermesChat())
    body = {"model": MODEL_NAME, "prompt": "w1", "n": 2, "stream": stream}
    with serving(app) as server, server.client() as http:
        # the first choice would wait for its first token forever: the 429 does not
        answer = http.post("/v1/completions", json=body, timeout=10)
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"]["code"] == "rate_limit_exceeded"
        assert loop.closed.wait(10)  # and the waiting choice is aborted
