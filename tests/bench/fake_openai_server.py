"""A fake OpenAI-compatible server with known timing, for the load generator's tests.

It streams ``max_tokens`` chunks of one word each (`` r<n>w<i>``: request n's i-th
word, so every answer is its own text): the first after ``first_token_s``, the rest
``token_gap_s`` apart, then a usage chunk (when asked for and ``send_usage``) and
``data: [DONE]``. It records every request body, the text it answered to each (by the
body's index), and the most requests it had in flight at once. Runs uvicorn on
127.0.0.1 on a free port in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


@dataclass
class FakeBehaviour:
    first_token_s: float = 0.05
    token_gap_s: float = 0.01
    fail_every: int = 0  # every k-th request is answered HTTP 500 (0: none)
    send_usage: bool = True
    raw_stream: tuple[str, ...] | None = None  # sent verbatim instead (another server's stream)
    error_body: dict[str, Any] | None = None  # the failures' JSON instead of OpenAI's shape


@dataclass
class FakeState:
    behaviour: FakeBehaviour
    bodies: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[int, str] = field(default_factory=dict)  # body index -> text streamed
    in_flight: int = 0
    max_in_flight: int = 0


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _choice(chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish}


async def _stream(
    state: FakeState, number: int, body: dict[str, Any], chat: bool
) -> AsyncIterator[str]:
    behaviour = state.behaviour
    num_tokens = int(body.get("max_tokens", 16))
    words = [f" r{number}w{i}" for i in range(num_tokens)]
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        await asyncio.sleep(behaviour.first_token_s)
        for i in range(num_tokens):
            if i:
                await asyncio.sleep(behaviour.token_gap_s)
            finish = "length" if i == num_tokens - 1 else None
            yield _event({"id": "x", "choices": [_choice(chat, words[i], finish)]})
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if wants_usage and behaviour.send_usage:
            prompt = body.get("prompt", "")
            usage = {
                "prompt_tokens": len(prompt) if isinstance(prompt, list) else 7,
                "completion_tokens": num_tokens,
                "total_tokens": 0,
            }
            yield _event({"id": "x", "choices": [], "usage": usage})
        state.answers[number] = "".join(words)
        yield "data: [DONE]\n\n"
    finally:
        state.in_flight -= 1


async def _verbatim(parts: tuple[str, ...]) -> AsyncIterator[str]:
    for part in parts:
        yield part


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def answer(request: Request, chat: bool) -> Any:
        body = await request.json()
        state.bodies.append(body)
        number = len(state.bodies) - 1
        every = state.behaviour.fail_every
        if every and len(state.bodies) % every == 0:
            error = {"message": "fake failure", "type": "server_error", "code": 500}
            return JSONResponse(state.behaviour.error_body or {"error": error}, status_code=500)
        raw = state.behaviour.raw_stream
        stream = _stream(state, number, body, chat) if raw is None else _verbatim(raw)
        return StreamingResponse(stream, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await answer(request, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fake_server(behaviour: FakeBehaviour | None = None) -> Iterator[tuple[str, FakeState]]:
    """The server's base URL and its recorded state, while the block runs."""
    state = FakeState(behaviour or FakeBehaviour())
    port = free_port()
    config = uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
