"""Fields that OpenAI clients send by default and vLLM's extensions: honoured where the
engine can (template variables, truncation, stop strings kept, special tokens, banned
words, the client's request id), accepted at their neutral value, else a 400 naming them."""

from __future__ import annotations

import pytest
from serve_helpers import (
    AGENT_TEMPLATE,
    MODEL_NAME,
    make_app,
    make_engine,
    serving,
    word_tokenizer,
    write_checkpoint,
)

pytest.importorskip("openai")
pytest.importorskip("fastapi")

USER = [{"role": "user", "content": "w3 w4"}]
PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("fields") / "ckpt", AGENT_TEMPLATE)
    with serving(make_app(make_engine(path), model_path=path)) as running:
        yield running


def _chat(server, **fields):
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=fields.pop("messages", USER), max_tokens=2, temperature=0,
        **fields,
    )  # fmt: skip


def _complete(server, **fields):
    return server.openai().completions.create(
        model=MODEL_NAME, prompt=fields.pop("prompt", PROMPT), max_tokens=fields.pop("n", 6),
        temperature=0, **fields,
    )  # fmt: skip


def _count(text: str) -> int:
    return len(word_tokenizer(AGENT_TEMPLATE).encode(text, add_special_tokens=False))


def test_what_clients_send_by_default_is_accepted(server):
    answer = _chat(
        server, modalities=["text"], verbosity="medium", prompt_cache_key="k",
        safety_identifier="s", metadata={"a": "b"}, store=False, service_tier="auto",
        prediction={"type": "content", "content": "w1 w2"}, parallel_tool_calls=True,
        extra_body={"priority": 0, "use_beam_search": False, "length_penalty": 1.0,
                    "spaces_between_special_tokens": False, "audio": None,
                    "web_search_options": None, "documents": None},
    )  # fmt: skip
    assert answer.usage.prompt_tokens == _count("<|user|> w3 w4 <|assistant|>")


def test_template_variables_and_rendering_fields_reach_the_template(server):
    def prompt_tokens(**fields) -> int:
        return _chat(server, **fields).usage.prompt_tokens

    plain = _count("<|user|> w3 w4 <|assistant|>")
    assert prompt_tokens() == plain
    assert (
        prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == plain + 1
    )
    assert prompt_tokens(reasoning_effort="w51") == plain + 1  # the template writes it
    assert prompt_tokens(extra_body={"documents": [{"text": "w52 w53"}]}) == plain + 2
    assert prompt_tokens(extra_body={"add_generation_prompt": False}) == plain - 1
    continued = [*USER, {"role": "assistant", "content": "w5 w6"}]
    assert prompt_tokens(
        messages=continued,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    ) == _count("<|user|> w3 w4 <|assistant|> w5 w6")  # fmt: skip


def test_truncate_prompt_tokens_keeps_the_last_ones(server):
    whole = _complete(server, prompt="w7 w8 w9 w10")
    cut = _complete(server, extra_body={"truncate_prompt_tokens": 4})
    assert cut.usage.prompt_tokens == 4 and cut.choices[0].text == whole.choices[0].text
    chat = _chat(server, extra_body={"truncate_prompt_tokens": 3})
    assert chat.usage.prompt_tokens == 3


def test_a_request_id_names_the_response(server):
    assert _chat(server, extra_body={"request_id": "agent-7"}).id == "chatcmpl-agent-7"
    chunks = list(_complete(server, stream=True, extra_body={"request_id": "r1"}))
    assert {c.id for c in chunks} == {"cmpl-r1"}
    assert _complete(server).id != _complete(server).id  # random without one


def test_a_stop_string_can_stay_in_the_output(server):
    text = _complete(server, n=8).choices[0].text
    stop = text.split()[2]
    end = text.index(stop) + len(stop)
    cut = _complete(server, n=8, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    kept = _complete(server, n=8, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:end] and kept.choices[0].finish_reason == "stop"


def test_special_tokens_are_written_when_asked(server):
    start = {"logit_bias": {"1": 100}}  # "<s>", a special token, every time
    assert _complete(server, n=3, **start).choices[0].text == ""
    kept = _complete(server, n=3, **start, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "<s> <s> <s>"
    end = {"logit_bias": {"2": 100}, "extra_body": {"skip_special_tokens": False}}
    ended = _complete(server, n=3, **end).choices[0]  # the end of sequence is not written
    assert ended.text == "" and ended.finish_reason == "stop"


def test_bad_words_of_one_token_are_banned(server):
    first = _complete(server, n=1).choices[0].text
    other = _complete(server, n=1, extra_body={"bad_words": [first]}).choices[0].text
    assert other and other != first


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"priority": 1}, "priority"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"length_penalty": 0.5}, "length_penalty"),
        ({"allowed_token_ids": [5, 6]}, "allowed_token_ids"),
        ({"bad_words": ["w1 w2"]}, "bad_words"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"verbosity": "low"}, "verbosity"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"max_token": 3}, "max_token"),  # a misspelling stays unknown
    ],
)
def test_what_the_engine_cannot_do_is_a_400_naming_the_field(server, fields, param):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 2, **fields}
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_fields_openai_lets_be_null_take_their_defaults(server):
    # OpenAI's schema makes n, stream and echo nullable; raw-JSON clients send them so
    nulls = {"model": MODEL_NAME, "max_tokens": 2, "n": None, "stream": None}
    with server.client() as http:
        chat = http.post("/v1/chat/completions", json={**nulls, "messages": USER})
        text = http.post("/v1/completions", json={**nulls, "prompt": PROMPT, "echo": None})
        response = http.post(
            "/v1/responses",
            json={"model": MODEL_NAME, "input": "w3", "max_output_tokens": 2, "stream": None},
        )
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1
    assert text.status_code == 200, text.text
    assert not text.json()["choices"][0]["text"].startswith(PROMPT)  # no echo
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "response"
