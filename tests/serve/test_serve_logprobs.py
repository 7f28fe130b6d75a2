"""Log-probabilities through `avmp serve` and the official openai client: completions'
``logprobs: k`` (OpenAI's legacy shape) and chat's ``logprobs`` / ``top_logprobs``,
streamed and not; greedy tokens are their positions' most likely ones. And
``logit_bias``, which steers the tokens but not the reported log-probabilities."""

from __future__ import annotations

import math

import pytest
from serve_helpers import MODEL_NAME, WORDS, make_app, make_engine, serving

WORD_IDS = {word: i for i, word in enumerate(WORDS)}

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "w3 w9 w27 w81"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(checkpoints):
    engine = make_engine(checkpoints["chat"])
    app = make_app(engine, model_path=checkpoints["chat"])
    with serving(app) as server:
        yield server


def test_completions_report_each_tokens_logprob_and_its_top_k(served):
    client = served.openai()
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0, logprobs=3)  # fmt: skip
    (choice,) = answer.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == answer.usage.completion_tokens
    assert len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0 and 1 <= len(top) <= 3
        assert max(top, key=top.get) == token and math.isclose(top[token], logprob, rel_tol=1e-5)
    offsets = [0] + [sum(len(t) for t in lp.tokens[: i + 1]) for i in range(len(lp.tokens) - 1)]
    assert lp.text_offset == offsets
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                         temperature=0, logprobs=3, stream=True)  # fmt: skip
    tokens, logprobs = [], []
    for chunk in streamed:
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
    assert tokens == lp.tokens and logprobs == pytest.approx(lp.token_logprobs)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_with_and_without_top_logprobs(served):
    client = served.openai()
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=True, top_logprobs=2)  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    alone = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True
    )
    assert [e.token for e in alone.choices[0].logprobs.content] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in alone.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)  # fmt: skip
    streamed = [e.token for chunk in stream for c in chunk.choices
                if c.logprobs is not None for e in c.logprobs.content]  # fmt: skip
    assert streamed == [e.token for e in content]


@pytest.mark.parametrize(
    ("endpoint", "fields", "message"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_logprobs_are_400s_naming_the_field(served, endpoint, fields, message):
    client = served.openai()
    with pytest.raises(openai.BadRequestError, match=message):
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                           messages=[{"role": "user", "content": "w1"}],
                                           **fields)  # fmt: skip
        else:
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, **fields)


def test_logit_bias_steers_tokens_and_bad_keys_are_400s(served):
    client = served.openai()
    first = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1,
                                       temperature=0, logprobs=1)  # fmt: skip
    token = first.choices[0].logprobs.tokens[0]
    banned = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
        logit_bias={str(WORD_IDS[token]): -100},
    )  # fmt: skip
    assert banned.choices[0].text.strip() != token
    assert list(banned.choices[0].logprobs.top_logprobs[0]) == [token]  # the model's own
    pushed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                       temperature=0, logit_bias={"50": 100},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert pushed.choices[0].text.split() == [WORDS[50]] * 4
    for bias, message in [({"w3": 1}, "token ids"), ({"50": 300}, "logit_bias"),
                          ({"999999": 1}, "logit_bias")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      logit_bias=bias)  # fmt: skip


def test_penalties_change_repeating_greedy_answers_and_stay_reproducible(served):
    client = served.openai()

    def answer(**fields) -> str:
        reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True},
                                          **fields)  # fmt: skip
        return reply.choices[0].text

    plain = answer()
    penalized = answer(frequency_penalty=2.0, presence_penalty=2.0)
    assert answer(frequency_penalty=2.0, presence_penalty=2.0) == penalized
    if len(set(plain.split())) < len(plain.split()):  # greedy repeats a word
        assert penalized != plain
        assert len(set(penalized.split())) > len(set(plain.split()))
    repeated = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
        extra_body={"repetition_penalty": 1.3},
    )  # fmt: skip
    assert repeated.choices[0].finish_reason in ("stop", "length")


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(served):
    """vLLM's stream option, which load generators use to count tokens as they come."""
    client = served.openai()
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    completion = [c.usage.completion_tokens for c in chunks]
    assert completion == sorted(completion) and completion[-1] == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "w1"}], max_tokens=3,
        stream=True, stream_options={"continuous_usage_stats": True},
    )  # fmt: skip
    assert all(c.usage is not None for c in chat)


def test_min_p_is_taken_and_checked(served):
    client = served.openai()
    reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, seed=1,
                                      temperature=1.0, extra_body={"min_p": 0.5})  # fmt: skip
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="min_p"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                  extra_body={"min_p": 1.5})  # fmt: skip
