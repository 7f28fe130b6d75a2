"""The OpenAI API of `avmp serve` through the official openai client: completions and
chat, streamed and not, batches, n with seeds, stop strings and ids, models, health and
metrics; greedy answers equal `Engine.generate` on the same engine."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import (
    MAX_MODEL_LEN,
    MODEL_NAME,
    make_app,
    make_engine,
    serving,
    wait_until,
    words,
)

pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 12
PROMPTS = [" ".join(f"w{(7 * i + j) % 100}" for j in range(3 + i % 5)) for i in range(32)]
CHAT_PROMPT = "<|user|> w5 w6 w7 <|assistant|>"  # what the template renders for CHAT


@pytest.fixture(scope="module")
def served(checkpoints):
    """The server, and greedy references computed by `Engine.generate` on its engine
    before the engine loop took it over."""
    engine = make_engine(checkpoints["chat"])
    reference = engine.generate(PROMPTS + [CHAT_PROMPT], max_tokens=MAX_TOKENS)
    app = make_app(engine, model_path=checkpoints["chat"])
    with serving(app) as server:
        yield server, reference


def test_completions_equal_engine_generate(served):
    server, reference = served
    client = server.openai()
    for i in (0, 1, 5):
        answer = client.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0
        )
        (choice,) = answer.choices
        assert choice.text == reference[i].text == words(reference[i].token_ids)
        assert choice.finish_reason == reference[i].finish_reason
        assert answer.usage.completion_tokens == len(reference[i].token_ids)
        assert answer.usage.prompt_tokens == len(reference[i].prompt_token_ids)
        assert (
            answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        )


def test_a_streamed_completion_is_the_same_text_and_ends_with_usage(served):
    server, reference = served
    chunks = list(
        server.openai().completions.create(
            model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert len(chunks) > 2  # streamed, not one body
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == reference[2].text
    assert pieces[-1].choices[0].finish_reason == reference[2].finish_reason
    assert all(c.usage is None for c in pieces)
    assert last.choices == [] and last.usage.completion_tokens == len(reference[2].token_ids)


def test_a_batch_of_prompts_and_token_ids(served):
    server, reference = served
    client = server.openai()
    answer = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[3:5], max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.text for c in answer.choices] == [reference[3].text, reference[4].text]
    assert answer.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in reference[3:5])
    by_ids = client.completions.create(
        model=MODEL_NAME, prompt=reference[6].prompt_token_ids, max_tokens=MAX_TOKENS,
        temperature=0,
    )  # fmt: skip
    assert by_ids.choices[0].text == reference[6].text


def test_chat_streamed_and_not_uses_the_chat_template(served):
    server, reference = served
    client = server.openai()
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == reference[-1].text
    assert answer.usage.prompt_tokens == len(reference[-1].prompt_token_ids)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference[-1].text
    assert chunks[-1].choices[0].finish_reason == reference[-1].finish_reason


def test_a_chat_without_a_limit_gets_the_room_its_prompt_leaves(served):
    # the default (256) is more than max_model_len (256) leaves beside any prompt: a
    # client that set no limit is answered, as OpenAI and vLLM answer it, not refused
    server, _ = served
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    answers = [
        server.openai().chat.completions.create(model=MODEL_NAME, messages=messages),
        server.openai().responses.create(model=MODEL_NAME, input="w5 w6 w7"),
    ]
    assert all(0 < answer.usage.total_tokens <= MAX_MODEL_LEN for answer in answers)
    if answers[0].choices[0].finish_reason == "length":
        assert answers[0].usage.total_tokens == MAX_MODEL_LEN


def test_n_choices_follow_their_seeds(served):
    server, _ = served
    client = server.openai()

    def texts(n: int, seed: int) -> list[str]:
        answer = client.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[7], max_tokens=8, temperature=1.0, n=n,
            seed=seed, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.index for c in answer.choices] == list(range(n))
        assert answer.usage.completion_tokens == 8 * n
        return [c.text for c in answer.choices]

    three = texts(3, seed=7)
    assert texts(3, seed=7) == three  # reproducible from the seed
    assert texts(1, seed=8) == three[1:2]  # choice j is the request with seed + j
    assert len(set(three)) > 1


def _long(reference) -> int:
    """A prompt whose greedy answer has 6 words or more (not an early end of sequence)."""
    return next(i for i, r in enumerate(reference[: len(PROMPTS)]) if len(r.token_ids) >= 6)


def test_a_stop_string_cuts_the_text_and_frees_the_request(served):
    server, reference = served
    i = _long(reference)
    text = reference[i].text
    stop = text.split()[3]
    answer = server.openai().completions.create(
        model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert answer.choices[0].text == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    assert wait_until(lambda: server.loop.snapshot().usage.num_requests == 0)


def test_a_stop_token_id_ends_the_text_after_it(served):
    server, reference = served
    i = _long(reference)
    ids = reference[i].token_ids
    answer = server.openai().completions.create(
        model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"stop_token_ids": [ids[2]]},
    )  # fmt: skip
    end = ids.index(ids[2]) + 1
    assert answer.choices[0].text == words(ids[:end])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == end


def test_min_tokens_keeps_stop_strings_and_ids_from_ending_it_early(served):
    """vLLM's min_tokens: a stop string or stop id met before that many tokens does not
    end the answer (the id cannot even be sampled there); more than max_tokens is a 400."""
    server, reference = served
    client = server.openai()
    i = _long(reference)
    text, ids = reference[i].text, reference[i].token_ids
    unique = next(j for j in range(3) if text.split().count(text.split()[j]) == 1)
    kept = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
        stop=[text.split()[unique]], extra_body={"min_tokens": 4},
    )  # fmt: skip
    assert kept.choices[0].text == text and kept.usage.completion_tokens == len(ids)
    held = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"stop_token_ids": [ids[2]], "min_tokens": 5},
    )  # fmt: skip
    assert held.usage.completion_tokens >= 5
    assert held.choices[0].text.split()[:2] == text.split()[:2]
    assert words([ids[2]]).strip() not in held.choices[0].text.split()[:5]
    import openai

    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=3,
                                  extra_body={"min_tokens": 4})  # fmt: skip


def test_the_developer_role_is_the_system_role(served):
    server, _ = served
    client = server.openai()

    def answer(role: str) -> str:
        messages = [{"role": role, "content": "w1 w2"}, {"role": "user", "content": "w5 w6"}]
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content

    assert answer("developer") == answer("system")


def test_32_concurrent_streams_each_equal_engine_generate(served):
    server, reference = served

    async def one(client, prompt: str) -> str:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_of_them() -> list[str]:
        async with server.async_openai() as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    assert asyncio.run(all_of_them()) == [r.text for r in reference[: len(PROMPTS)]]


def test_models_health_and_metrics(served):
    server, _ = served
    assert [m.id for m in server.openai().models.list().data] == [MODEL_NAME]
    with server.client() as http:
        assert http.get("/health").status_code == 200
        http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "w1", "max_tokens": 2})
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    values = _samples(metrics.text)
    budget = values["avmp_cache_budget_bytes"]
    assert budget == 32 << 20
    pools = values["avmp_kv_pool_capacity_bytes"] + values["avmp_state_pool_capacity_bytes"]
    assert pools + values["avmp_cache_unassigned_bytes"] == budget
    assert values["avmp_generation_tokens_total"] >= 2
    assert values["avmp_time_to_first_token_seconds_count"] >= 1
    assert values["avmp_e2e_request_latency_seconds_count"] >= 1
    assert values["avmp_engine_healthy"] == 1
    for name in ("avmp_requests_running", "avmp_requests_waiting", "avmp_migrations_total",
                 "avmp_compactions_total", "avmp_preemptions_total", "avmp_swapped_out_total",
                 "avmp_kv_pool_used_bytes", "avmp_state_pool_used_bytes",
                 "avmp_inter_token_latency_seconds_count"):  # fmt: skip
        assert name in values
    assert 'avmp_chunks_migrated_total{to="kv"}' in metrics.text


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


@pytest.mark.gpu
def test_on_cuda_concurrent_streams_equal_engine_generate(checkpoints):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = make_engine(checkpoints["chat"], device="cuda")  # Triton kernels, overlap, graphs
    reference = engine.generate(PROMPTS, max_tokens=MAX_TOKENS)
    with serving(make_app(engine)) as server:

        async def one(client, prompt: str) -> str:
            stream = await client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True,
            )  # fmt: skip
            return "".join([chunk.choices[0].text async for chunk in stream])

        async def all_of_them() -> list[str]:
            async with server.async_openai() as client:
                return await asyncio.gather(*(one(client, p) for p in PROMPTS))

        assert asyncio.run(all_of_them()) == [r.text for r in reference]
        assert wait_until(lambda: server.loop.snapshot().usage.num_requests == 0)
