"""Every class of bad request gets OpenAI's error shape and its status, and the server
answers a good request right after each."""

from __future__ import annotations

import threading

import pytest
from serve_helpers import MAX_MODEL_LEN, MODEL_NAME, make_app, make_engine, serving

pytest.importorskip("fastapi")

GOOD = {"model": MODEL_NAME, "prompt": "w1 w2", "max_tokens": 3}


@pytest.fixture(scope="module")
def server(checkpoints):
    app = make_app(make_engine(checkpoints["chat"]), model_path=checkpoints["chat"])
    with serving(app) as running:
        yield running


def _assert_error(response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def _assert_serving(http) -> None:
    answer = http.post("/v1/completions", json=GOOD)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1


BAD_BODIES = [
    pytest.param({"prompt": "w1"}, 400, "model", None, id="missing-model"),
    pytest.param({**GOOD, "max_token": 3}, 400, "max_token", None, id="unknown-field"),
    pytest.param({**GOOD, "temperature": 5}, 400, "temperature", None, id="temperature"),
    pytest.param({**GOOD, "top_p": 0}, 400, "top_p", None, id="top-p"),
    pytest.param({**GOOD, "max_tokens": 0}, 400, "max_tokens", None, id="max-tokens"),
    pytest.param({**GOOD, "n": 0}, 400, "n", None, id="n"),
    pytest.param({**GOOD, "stream": "often"}, 400, "stream", None, id="stream-type"),
    pytest.param({**GOOD, "logprobs": 21}, 400, "logprobs", None, id="logprobs"),
    pytest.param(
        {**GOOD, "max_tokens": -1, "echo": True}, 400, "max_tokens", None, id="max-tokens-negative"
    ),
    pytest.param(
        {**GOOD, "prompt_logprobs": 21}, 400, "prompt_logprobs", None, id="prompt-logprobs"
    ),
    pytest.param(
        {**GOOD, "prompt_logprobs": 1, "stream": True},
        400,
        "prompt_logprobs",
        None,
        id="prompt-logprobs-streamed",
    ),
    pytest.param({**GOOD, "best_of": 3}, 400, "best_of", None, id="best-of"),
    pytest.param({**GOOD, "presence_penalty": 2.5}, 400, "presence_penalty", None, id="penalty"),
    pytest.param(
        {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty", None, id="repetition-penalty"
    ),  # fmt: skip
    pytest.param(
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        None,
        id="stream-options-without-stream",
    ),  # fmt: skip
    pytest.param({**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found", id="model"),
    pytest.param({**GOOD, "prompt": ""}, 400, "prompt", None, id="empty-prompt"),
    pytest.param({**GOOD, "prompt": []}, 400, "prompt", None, id="no-prompt"),
    pytest.param({**GOOD, "prompt": [5, 100000]}, 400, None, None, id="out-of-vocab"),
    pytest.param(
        {**GOOD, "max_tokens": MAX_MODEL_LEN},
        400,
        "prompt",
        "context_length_exceeded",
        id="too-long",
    ),  # fmt: skip
    pytest.param(
        {**GOOD, "prompt": "w1 " * MAX_MODEL_LEN, "stream": True},
        400,
        "prompt",
        "context_length_exceeded",
        id="too-long-streamed",
    ),  # fmt: skip
]


@pytest.mark.parametrize("body, status, param, code", BAD_BODIES)
def test_bad_completion_bodies(server, body, status, param, code):
    with server.client() as http:
        _assert_error(http.post("/v1/completions", json=body), status, param, code)
        _assert_serving(http)


def test_malformed_json_and_wrong_routes(server):
    with server.client() as http:
        bad = http.post("/v1/completions", content=b'{"model": "x", ',
                        headers={"content-type": "application/json"})  # fmt: skip
        assert "JSON" in _assert_error(bad, 400)["message"]
        _assert_serving(http)
        _assert_error(http.post("/v1/nothing", json=GOOD), 404)
        _assert_error(http.get("/v1/completions"), 405)
        _assert_serving(http)


def test_bad_chat_bodies(server):
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}
    with server.client() as http:
        for body, param in [
            ({**chat, "messages": []}, "messages"),
            ({**chat, "messages": [{"role": "robot", "content": "w1"}]}, None),
            ({**chat, "tools": [{"type": "function"}]}, "tools.0.function"),
            ({**chat, "tools": [], "tool_choice": "required"}, None),
            ({**chat, "top_logprobs": 2}, "top_logprobs"),
            ({**chat, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
            ({**chat, "max_completion_tokens": 0}, "max_completion_tokens"),
        ]:
            _assert_error(http.post("/v1/chat/completions", json=body), 400, param)
            _assert_serving(http)
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.fixture(scope="module")
def guarded(checkpoints):
    """A server with an API key, no chat template, one running request and one waiting
    at most."""
    engine = make_engine(checkpoints["plain"], max_num_seqs=1)
    app = make_app(engine, max_waiting=1, api_key="sesame", model_path=checkpoints["plain"])
    with serving(app) as running:
        yield running


def test_api_key(guarded):
    with guarded.client() as http:
        _assert_error(http.post("/v1/completions", json=GOOD), 401, code="invalid_api_key")
        wrong = {"Authorization": "Bearer sesame2"}
        _assert_error(http.post("/v1/completions", json=GOOD, headers=wrong), 401)
        _assert_error(http.get("/v1/models"), 401)
        _assert_error(http.get(f"/v1/models/{MODEL_NAME}"), 401)
        _assert_error(http.post("/tokenize", json={"prompt": "w1"}), 401)
        _assert_error(http.post("/detokenize", json={"tokens": [7]}), 401)
        _assert_error(http.post("/v1/responses", json={"model": MODEL_NAME, "input": "w1"}), 401)
        for probe in ("/health", "/ping", "/version"):  # probes need no key
            assert http.get(probe).status_code == 200
    with guarded.client(headers={"Authorization": "Bearer sesame"}) as http:
        _assert_serving(http)


def test_chat_without_a_template_is_a_clear_400(guarded):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w1"}]}
    with guarded.client(headers={"Authorization": "Bearer sesame"}) as http:
        error = _assert_error(http.post("/v1/chat/completions", json=body), 400, "messages")
        assert "chat template" in error["message"]
        _assert_serving(http)


def test_a_full_queue_is_429_with_retry_after(guarded):
    long = {**GOOD, "max_tokens": 150, "ignore_eos": True}
    answers: list = []
    with guarded.client(headers={"Authorization": "Bearer sesame"}) as http:

        def send() -> None:
            answers.append(http.post("/v1/completions", json=long))

        threads = [threading.Thread(target=send) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        full = next(a for a in answers if a.status_code == 429)
        _assert_error(full, 429, code="rate_limit_exceeded")
        assert int(full.headers["retry-after"]) >= 1
        _assert_serving(http)


def test_a_dead_engine_is_503_and_unhealthy(checkpoints):
    engine = make_engine(checkpoints["chat"])
    broken = {"now": False}
    step = engine.step

    def failing_step():
        if broken["now"]:
            raise RuntimeError("the device fell off the bus")
        return step()

    engine.step = failing_step  # the loop calls it from its thread
    with serving(make_app(engine)) as server, server.client() as http:
        _assert_serving(http)
        broken["now"] = True
        error = _assert_error(http.post("/v1/completions", json=GOOD), 503)
        assert "fell off the bus" in error["message"]
        health = http.get("/health")
        assert health.status_code == 503 and "fell off the bus" in health.json()["error"]
        _assert_error(http.post("/v1/completions", json=GOOD), 503)
        assert "avmp_engine_healthy 0.0" in http.get("/metrics").text
