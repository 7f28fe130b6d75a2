"""A soak of the request features together: completions with echo, log-probabilities of
the output and of the prompt, ``max_tokens: 0``, truncation, stop strings kept, penalties
and biases; chats with tools, template variables and log-probabilities; some streams
abandoned; all with the prefix cache on, so requests that take cached prefixes run beside
requests that must not (prompt log-probabilities) in small steps. Every answer must be
well formed, and afterwards the allocator holds nothing and its invariants hold
(preemption with prompt log-probabilities: tests/engine/test_prompt_logprobs.py)."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from serve_helpers import (
    AGENT_TEMPLATE,
    MODEL_NAME,
    TIMEOUT_S,
    make_app,
    make_engine,
    serving,
    wait_until,
    write_checkpoint,
)

pytest.importorskip("fastapi")

NUM_REQUESTS = 160
CONCURRENCY = 16
SHARED = " ".join(f"w{i}" for i in range(10, 40))  # a prefix many prompts share
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(f"w{rng.randrange(100)}" for _ in range(rng.randint(low, high)))


def _completion(rng: random.Random, i: int) -> dict:
    prompt = (SHARED + " " if rng.random() < 0.5 else "") + _words(rng, 1, 12)
    body: dict = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": rng.randint(1, 6),
                  "temperature": rng.choice([0.0, 0.8]), "seed": i,
                  "stream": rng.random() < 0.4}  # fmt: skip
    pick = rng.random()
    if pick < 0.15:
        body.update(echo=True, logprobs=rng.randint(0, 3))
    elif pick < 0.25:
        body.update(echo=True, max_tokens=0, logprobs=1, stream=False)  # lm-eval's scoring
    elif pick < 0.4:
        body.update(prompt_logprobs=rng.randint(0, 3), stream=False)
    elif pick < 0.5:
        body.update(logprobs=2)
    if rng.random() < 0.15:
        body.update(stop=[f"w{rng.randrange(100)}"], include_stop_str_in_output=True)
    if rng.random() < 0.1:
        body["truncate_prompt_tokens"] = rng.randint(1, 8)
    if rng.random() < 0.1:
        body.update(frequency_penalty=0.5, presence_penalty=0.3, logit_bias={"7": 2.0})
    if rng.random() < 0.1 and body["max_tokens"] > 0:
        body["n"] = 2
    return body


def _chat(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": SHARED}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": _words(rng, 1, 10)})
    body: dict = {"model": MODEL_NAME, "messages": messages, "max_tokens": rng.randint(1, 6),
                  "temperature": rng.choice([0.0, 0.8]), "seed": i,
                  "stream": rng.random() < 0.4}  # fmt: skip
    if rng.random() < 0.3:
        body.update(tools=[TOOL], tool_choice=rng.choice(["auto", "none"]))
    if rng.random() < 0.2:
        body.update(logprobs=True, top_logprobs=2)
    if rng.random() < 0.2:
        body["chat_template_kwargs"] = {"enable_thinking": True}
    return body


def _check(path: str, body: dict, answer: dict) -> str:
    """"ok" when a whole answer has the shape its request asked for, else what is wrong."""
    choices = answer.get("choices") or []
    if len(choices) != body.get("n", 1):
        return f"{len(choices)} choices for n={body.get('n', 1)}"
    if path == "/v1/completions":
        for choice in choices:
            echoed = body.get("echo") and "truncate_prompt_tokens" not in body
            if echoed and not choice["text"].startswith(body["prompt"]):
                return f"echo without the prompt: {choice['text']!r}"
            if body.get("prompt_logprobs") is not None:
                lps = choice.get("prompt_logprobs")
                if not lps or lps[0] is not None:
                    return f"prompt_logprobs {lps!r}"
            if body.get("max_tokens") == 0 and choice["finish_reason"] != "length":
                return f"max_tokens 0 finished {choice['finish_reason']}"
    return "ok"


async def _one(http: httpx.AsyncClient, path: str, body: dict, leave_early: bool) -> str:
    if not body["stream"]:
        answer = await http.post(path, json=body)
        if answer.status_code != 200:
            return f"{answer.status_code}: {answer.text}"
        return _check(path, body, answer.json())
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return f"{response.status_code}: {(await response.aread()).decode()}"
        async for line in response.aiter_lines():
            if leave_early and line.startswith("data: {"):
                return "left"
            if line.startswith("data: {"):
                json.loads(line.removeprefix("data: "))  # every event is whole JSON
            if line == "data: [DONE]":
                return "ok"
    return "stream ended without [DONE]"


async def _soak(url: str) -> list[str]:
    rng = random.Random(1)
    requests = [
        ("/v1/completions", _completion(rng, i)) if rng.random() < 0.6
        else ("/v1/chat/completions", _chat(rng, i))
        for i in range(NUM_REQUESTS)
    ]  # fmt: skip
    leave = [rng.random() < 0.1 for _ in requests]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(http: httpx.AsyncClient, path: str, body: dict, early: bool) -> str:
        async with gate:
            return await _one(http, path, body, early)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as http:
        return await asyncio.gather(
            *(limited(http, p, b, e) for (p, b), e in zip(requests, leave, strict=True))
        )


def test_a_soak_of_every_feature_with_the_prefix_cache(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", AGENT_TEMPLATE)
    engine = make_engine(path, memory_bytes=8 << 20, max_num_seqs=8, prefix_cache="avmp",
                         max_num_batched_tokens=32)  # fmt: skip
    with serving(make_app(engine, model_path=path)) as server:
        outcomes = asyncio.run(_soak(server.url))
        bad = [o for o in outcomes if o not in ("ok", "left")]
        assert not bad, bad[:5]
        assert outcomes.count("left") > 3
        idle = lambda: server.loop.snapshot().usage.num_requests == 0  # noqa: E731
        assert wait_until(idle), server.loop.snapshot()
        snap = server.loop.snapshot()
        assert snap.num_running == snap.num_waiting == 0 and snap.healthy
        assert snap.totals.num_requests >= NUM_REQUESTS
        prefix = snap.totals.prefix
        assert prefix.num_hit_tokens > 0, "prompts share a prefix"
    usage = engine.allocator.usage()
    # what is still held is the cache's alone
    assert usage.num_requests == 0
    assert (usage.num_slots_used, usage.num_pages_used) == (prefix.num_checkpoints,
                                                            prefix.num_pages)  # fmt: skip
    engine.allocator.check_integrity()
