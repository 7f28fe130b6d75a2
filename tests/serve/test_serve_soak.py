"""A soak: a few hundred short requests of every kind, some abandoned mid-stream; after
them the allocator holds nothing and its invariants hold."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from serve_helpers import MODEL_NAME, TIMEOUT_S, make_app, make_engine, serving, wait_until

pytest.importorskip("fastapi")

NUM_REQUESTS = 300
CONCURRENCY = 24


def _body(rng: random.Random, i: int) -> dict:
    body = {
        "model": MODEL_NAME,
        "prompt": " ".join(f"w{rng.randrange(100)}" for _ in range(rng.randint(1, 12))),
        "max_tokens": rng.randint(1, 6),
        "temperature": rng.choice([0.0, 0.8]),
        "seed": i,
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.2:
        body["stop"] = [f"w{rng.randrange(100)}"]
    if rng.random() < 0.1:
        body["n"] = 2
    return body


async def _one(http: httpx.AsyncClient, body: dict, leave_early: bool) -> str:
    if not body["stream"]:
        answer = await http.post("/v1/completions", json=body)
        return "ok" if answer.status_code == 200 else answer.text
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if leave_early and line.startswith("data: {"):
                return "left"
            if line == "data: [DONE]":
                return "ok"
    return "stream ended without [DONE]"


async def _soak(url: str) -> list[str]:
    rng = random.Random(0)
    bodies = [_body(rng, i) for i in range(NUM_REQUESTS)]
    leave = [rng.random() < 0.1 for _ in bodies]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(http: httpx.AsyncClient, body: dict, leave_early: bool) -> str:
        async with gate:
            return await _one(http, body, leave_early)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as http:
        return await asyncio.gather(
            *(limited(http, b, e) for b, e in zip(bodies, leave, strict=True))
        )


def test_after_a_soak_the_allocator_is_empty_and_consistent(checkpoints):
    engine = make_engine(checkpoints["chat"], memory_bytes=8 << 20, max_num_seqs=16)
    with serving(make_app(engine)) as server:
        outcomes = asyncio.run(_soak(server.url))
        assert set(outcomes) <= {"ok", "left"}, [o for o in outcomes if o not in ("ok", "left")]
        assert outcomes.count("left") > 10
        idle = lambda: server.loop.snapshot().usage.num_requests == 0  # noqa: E731
        assert wait_until(idle), server.loop.snapshot()
        snap = server.loop.snapshot()
        assert snap.num_running == snap.num_waiting == 0 and snap.healthy
        assert snap.totals.num_requests >= NUM_REQUESTS
    usage = engine.allocator.usage()
    assert usage.num_requests == usage.num_pages_used == usage.num_slots_used == 0
    engine.allocator.check_integrity()
