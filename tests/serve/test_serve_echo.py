"""Completions' ``echo`` and vLLM's ``prompt_logprobs`` through `avmp serve`: the body
lm-evaluation-harness's ``local-completions`` sends to score log-likelihoods, the
official openai client, streaming, ``max_tokens: 0``, ``n`` > 1 and batches; every
prompt log-probability is transformers' own (log-softmax of its forward pass)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import MODEL_NAME, make_app, make_engine, serving, transformers, words

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "w3 w9 w27 w81 w5 w17"
IDS = [[10, 11, 12, 13, 14, 15, 16], [40, 41, 42]]


@pytest.fixture(scope="module")
def served(checkpoints):
    engine = make_engine(checkpoints["chat"])
    app = make_app(engine, model_path=checkpoints["chat"])
    with serving(app) as server:
        yield server


@pytest.fixture(scope="module")
def hf(checkpoints):
    return transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints["chat"])).eval()


def _encode(served, text: str) -> list[int]:
    return served.loop.engine.tokenizer.encode(text)


def _reference(hf, prompt: list[int]) -> tuple[list[float], list[int], torch.Tensor]:
    """transformers' log-probability and rank of every prompt token p >= 1, and the
    log-softmax rows before them ``[P - 1, V]``."""
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    return chosen[:, 0].tolist(), ranks, logprobs


def _offsets(tokens: list[str]) -> list[int]:
    return [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_the_lm_eval_body_scores_every_prompt_token(served, hf):
    """lm-eval's ``local-completions`` loglikelihood request: token-id prompts, one
    output token, echo and ``logprobs: 1``; it reads ``token_logprobs[ctxlen:-1]`` and
    calls a continuation greedy when each equals its position's top value."""
    body = {"model": MODEL_NAME, "prompt": IDS, "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}  # fmt: skip
    with served.client() as http:
        answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    choices = sorted(data["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(IDS, choices, strict=True):
        lp = choice["logprobs"]
        assert choice["text"].startswith(words(prompt)) and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["tokens"][: len(prompt)] == [words([t]) for t in prompt]
        assert lp["text_offset"] == _offsets(lp["tokens"])
        chosen, _, logprobs = _reference(hf, prompt)
        assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(chosen, abs=1e-4)
        for i, top in enumerate(lp["top_logprobs"][1 : len(prompt)]):
            (text, value), best = next(iter(top.items())), int(logprobs[i].argmax())
            assert len(top) == 1 and text == words([best])
            assert value == pytest.approx(float(logprobs[i, best]), abs=1e-4)
            greedy = prompt[i + 1] == best
            assert (lp["token_logprobs"][i + 1] == value) == greedy
        output = lp["token_logprobs"][-1]
        assert output <= 0 and max(lp["top_logprobs"][-1].values()) == output  # temperature 0
    assert data["usage"]["prompt_tokens"] == sum(len(p) for p in IDS)
    assert data["usage"]["completion_tokens"] == 2


def test_echo_through_the_openai_client(served, hf):
    """The echoed choice is the prompt, then the plain choice's text and log-probs."""
    client = served.openai()
    args = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    plain = client.completions.create(**args)
    echoed = client.completions.create(**args, echo=True)
    (p,), (e,) = plain.choices, echoed.choices
    assert e.text == PROMPT + p.text and e.finish_reason == p.finish_reason
    prompt = _encode(served, PROMPT)
    num = len(prompt)
    lp = e.logprobs
    assert lp.tokens == [words([t]) for t in prompt] + p.logprobs.tokens
    assert lp.token_logprobs[num:] == pytest.approx(p.logprobs.token_logprobs)
    for mine, theirs in zip(lp.top_logprobs[num:], p.logprobs.top_logprobs, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)
    assert lp.text_offset == _offsets(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    chosen, _, _ = _reference(hf, prompt)
    assert lp.token_logprobs[1:num] == pytest.approx(chosen, abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert echoed.usage == plain.usage
    text_only = client.completions.create(**{**args, "logprobs": None}, echo=True)
    assert text_only.choices[0].text == e.text and text_only.choices[0].logprobs is None


def test_max_tokens_zero_echoes_the_prompt_alone(served, hf):
    """A batch of two prompts, two choices each: every choice is its prompt, reason
    ``length``, no completion tokens; token-id prompts come back decoded."""
    client = served.openai()
    prompts = [PROMPT, "w7 w8"]
    answer = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=0, echo=True,
                                       logprobs=1, n=2)  # fmt: skip
    assert len(answer.choices) == 4
    for choice in answer.choices:
        prompt = prompts[choice.index // 2]
        ids = _encode(served, prompt)
        assert choice.text == prompt and choice.finish_reason == "length"
        assert choice.logprobs.tokens == [words([t]) for t in ids]
        chosen, _, _ = _reference(hf, ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(chosen, abs=1e-4)
    lengths = sum(len(_encode(served, p)) for p in prompts)
    assert answer.usage.prompt_tokens == lengths and answer.usage.completion_tokens == 0
    ids = client.completions.create(model=MODEL_NAME, prompt=IDS[0], max_tokens=0, echo=True)
    assert ids.choices[0].text == words(IDS[0]) and ids.choices[0].logprobs is None
    with served.client() as http:
        refused = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT,
                                                     "max_tokens": 0})  # fmt: skip
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "max_tokens"


def test_echo_streamed(served):
    """The prompt comes first in each choice's first chunk, then the output as it is
    generated; joined, every choice is the non-streamed one."""
    client = served.openai()
    args = dict(model=MODEL_NAME, prompt=[PROMPT, "w7 w8"], max_tokens=5, temperature=0,
                logprobs=1, echo=True, n=2)  # fmt: skip
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            if c.index not in texts:
                assert c.text.startswith(args["prompt"][c.index // 2])
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
                offsets.setdefault(c.index, []).extend(c.logprobs.text_offset)
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
        assert offsets[choice.index] == choice.logprobs.text_offset
    assert chunks[-1].usage == whole.usage


def test_prompt_logprobs_as_vllm_gives_them(served, hf):
    """``prompt_logprobs: k`` on both endpoints: None first, then per position the
    prompt token's entry (its rank over the vocabulary) and the top k's (ranks 1..k)."""
    with served.client() as http:
        answer = http.post(
            "/v1/completions",
            json={
                "model": MODEL_NAME,
                "prompt": PROMPT,
                "max_tokens": 2,
                "temperature": 0,
                "prompt_logprobs": 2,
            },
        )
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "w5 w6 w7"}],
            "max_tokens": 2, "prompt_logprobs": 1})  # fmt: skip
    assert answer.status_code == 200 and chat.status_code == 200, (answer.text, chat.text)
    (choice,) = answer.json()["choices"]
    assert choice["text"] and not choice["text"].startswith(PROMPT)  # no echo
    prompt = _encode(served, PROMPT)
    chosen, ranks, logprobs = _reference(hf, prompt)
    given = choice["prompt_logprobs"]
    assert len(given) == len(prompt) and given[0] is None
    for i, (token, entries) in enumerate(zip(prompt[1:], given[1:], strict=True)):
        mine = entries[str(token)]
        assert mine["logprob"] == pytest.approx(chosen[i], abs=1e-4)
        assert mine["rank"] == ranks[i] and mine["decoded_token"] == words([token])
        top = logprobs[i].topk(2)
        for rank, (value, best) in enumerate(zip(top.values, top.indices, strict=True), 1):
            entry = entries[str(int(best))]
            assert entry["logprob"] == pytest.approx(float(value), abs=1e-4)
            assert entry["rank"] == rank
        assert len(entries) == 2 + (ranks[i] > 2)
    (chat_choice,) = chat.json()["choices"]
    chat_given = chat_choice["prompt_logprobs"]
    assert len(chat_given) == chat.json()["usage"]["prompt_tokens"] and chat_given[0] is None
    assert all(1 <= len(entries) <= 2 for entries in chat_given[1:])
    plain = served.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                               temperature=0)  # fmt: skip
    assert plain.choices[0].text == choice["text"]
    assert plain.model_dump()["choices"][0].get("prompt_logprobs") is None
