"""The endpoints and options operators use besides generation: vLLM's ``/tokenize`` and
``/detokenize``, one model's card, ``/version`` and ``/ping``, ``--chat-template``,
CORS (``--allowed-origins``), and chat's deprecated ``functions`` / ``function_call``."""

from __future__ import annotations

import json

import pytest
from serve_helpers import (
    AGENT_TEMPLATE,
    CHAT_TEMPLATE,
    MAX_MODEL_LEN,
    MODEL_NAME,
    TIME_CALL,
    CharTokenizer,
    ScriptedLoop,
    agent_server,
    make_app,
    make_engine,
    scripted_app,
    serving,
    word_tokenizer,
)

import avmp
from avmp.cli import main

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

USER = [{"role": "user", "content": "w3 w4"}]
TOOL = {"type": "function", "function": {"name": "w42", "parameters": {"type": "object"}}}
FUNCTION = {"name": "get_time", "description": "the time", "parameters": {"type": "object"}}
TIME = TIME_CALL


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("operator")
    with agent_server(directory, allowed_origins=("http://ui.example",)) as running:
        yield running


def test_tokenize_a_prompt_as_the_tokenizer_does(agent):
    words = word_tokenizer(AGENT_TEMPLATE)
    with agent.client() as http:
        answer = http.post("/tokenize", json={"prompt": "w3 w4 w5"}).json()
        plain = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "w3 w4 w5",
                                             "add_special_tokens": False,
                                             "return_token_strs": True}).json()  # fmt: skip
        text = http.post("/detokenize", json={"tokens": answer["tokens"]}).json()
    assert answer["tokens"] == words.encode("w3 w4 w5")
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == MAX_MODEL_LEN
    assert plain["tokens"] == words.encode("w3 w4 w5", add_special_tokens=False)
    assert plain["token_strs"] == ["w3", "w4", "w5"]
    assert text == {"prompt": "w3 w4 w5"}


def test_tokenize_a_chat_as_chat_completions_prompts_it(agent):
    with agent.client() as http:
        answer = http.post("/tokenize", json={"messages": USER, "tools": [TOOL]}).json()
    chat = agent.openai().chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=[TOOL], max_tokens=1
    )
    rendered = "<|system|> w42 <|user|> w3 w4 <|assistant|>"
    assert answer["tokens"] == word_tokenizer(AGENT_TEMPLATE).encode(
        rendered, add_special_tokens=False
    )
    assert answer["count"] == chat.usage.prompt_tokens


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {"prompt": "w1", "messages": USER}, None),
        ("/tokenize", {}, None),
        ("/tokenize", {"messages": USER, "add_generation_prompt": True,
                       "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"prompt": "w1", "bogus": 1}, "bogus"),
        ("/detokenize", {"tokens": [3, 100000]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "w1"}, "tokens"),
    ],
)  # fmt: skip
def test_bad_token_requests_are_400s(agent, path, body, param):
    with agent.client() as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_another_models_name_is_a_404_everywhere(agent):
    client = agent.openai()
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.object == "model"
    with agent.client() as http:  # vLLM's fields that clients size their requests by
        tokenized = http.post("/tokenize", json={"prompt": "w1"}).json()
    assert card.max_model_len == tokenized["max_model_len"] > 0 and card.root == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("org/other-model")
    assert raised.value.body["code"] == "model_not_found"
    assert raised.value.body["type"] == "invalid_request_error"
    with agent.client() as http:
        assert http.post("/tokenize", json={"model": "x", "prompt": "w1"}).status_code == 404
        assert http.post("/detokenize", json={"model": "x", "tokens": [7]}).status_code == 404


def test_version_and_ping(agent):
    with agent.client() as http:
        assert http.get("/version").json() == {"version": avmp.__version__}
        assert http.get("/ping").status_code == 200
        assert http.post("/ping").status_code == 200


def test_cors_answers_the_allowed_origins_alone(agent, checkpoints):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    with agent.client() as http:
        allowed = http.options("/v1/chat/completions",
                               headers={"Origin": "http://ui.example", **preflight})  # fmt: skip
        other = http.options("/v1/chat/completions",
                             headers={"Origin": "http://evil.example", **preflight})  # fmt: skip
        simple = http.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "http://ui.example"
    from avmp.serve.app import ServeConfig, create_app

    closed = create_app(ScriptedLoop(), CharTokenizer(), ServeConfig(model_name=MODEL_NAME))
    with serving(closed) as server, server.client() as http:  # default: no CORS at all
        answer = http.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in answer.headers


def test_max_model_len_without_a_limit_is_what_memory_holds(checkpoints):
    engine = make_engine(checkpoints["plain"], max_model_len=None, memory_bytes=8 << 20)
    limit = engine.max_request_tokens()
    assert engine.allocator.fits_alone(limit) and not engine.allocator.fits_alone(limit + 1)
    app = make_app(engine, model_path=checkpoints["plain"])
    with serving(app) as server, server.client() as http:
        assert http.post("/tokenize", json={"prompt": "w1"}).json()["max_model_len"] == limit


def test_a_chat_template_serves_a_checkpoint_without_one(checkpoints, tmp_path):
    engine = make_engine(checkpoints["plain"])
    app = make_app(engine, model_path=checkpoints["plain"], chat_template=CHAT_TEMPLATE)
    with serving(app) as server:
        answer = server.openai().chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=2, temperature=0
        )
    rendered = "<|user|> w3 w4 <|assistant|>"
    expected = word_tokenizer(True).encode(rendered, add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(
    "value, message",
    [
        ("{% for m in messages %}", "line 1"),  # a syntax error
        ("missing-template.jinja", "no such file"),
        ("{{ messages[0].content | no_such_filter }}", "no_such_filter"),  # fails to render
        ("<dir>", "a directory, not a template file"),
        ("<latin-1>", "not UTF-8 text"),
    ],
)
def test_a_bad_chat_template_is_one_line(capsys, checkpoints, tmp_path, value, message):
    if value == "<dir>":
        value = str(tmp_path)
    elif value == "<latin-1>":
        value = str(tmp_path / "chat.jinja")
        (tmp_path / "chat.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    args = ["serve", str(checkpoints["plain"]), "--port", "0", "--chat-template", value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--chat-template" in err and message in err


def test_a_chat_template_file_and_the_demo_tokenizer(capsys, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    zoo = ["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny", "--port", "0"]
    assert main(["serve", *zoo, "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mistral-common" in err


@pytest.mark.parametrize("value", ["[1, 2]", "[not json"])
def test_bad_allowed_origins_are_one_line(capsys, value):
    zoo = ["granite-4.0-h-tiny", "--random-weights", "--scale", "tiny"]
    assert main(["serve", *zoo, "--allowed-origins", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allowed-origins" in err


def test_allowed_origins_take_vllms_json_or_commas():
    from avmp.cli.serve import _origins

    assert _origins('["http://a", "*"]') == ("http://a", "*")
    assert _origins("http://a, http://b") == ("http://a", "http://b")
    assert _origins(None) == ()


@pytest.fixture(scope="module")
def scripted():
    app, _, chat = scripted_app()
    with serving(app) as running:
        running.chat = chat
        yield running


def _functions(server, stream: bool = False, **fields):
    with server.client() as http:
        body = {"model": MODEL_NAME, "messages": USER, "functions": [FUNCTION], "stream": stream,
                **fields}  # fmt: skip
        return http.post("/v1/chat/completions", json=body)


def test_functions_are_read_as_tools_and_answered_as_a_function_call(scripted):
    scripted.loop.script = f"Now: <tool_call>{TIME}</tool_call><tool_call>{TIME}</tool_call>"
    answer = _functions(scripted)
    assert scripted.chat.last_rendering.tools == [{"type": "function", "function": FUNCTION}]
    (choice,) = answer.json()["choices"]
    assert choice["finish_reason"] == "function_call"
    message = choice["message"]
    assert message["content"] == "Now:" and message["tool_calls"] is None
    assert message["function_call"] == {"name": "get_time", "arguments": "{}"}  # one call
    events = [json.loads(line[6:]) for line in _functions(scripted, stream=True).text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    deltas = [e["choices"][0] for e in events if e["choices"]]
    calls = [d["delta"]["function_call"] for d in deltas if d["delta"].get("function_call")]
    assert calls == [{"name": "get_time", "arguments": "{}"}]
    assert not any(d["delta"].get("tool_calls") for d in deltas)
    assert deltas[-1]["finish_reason"] == "function_call"


def test_function_call_none_reads_no_call_and_a_name_forces_one(scripted):
    scripted.loop.script = f"<tool_call>{TIME}</tool_call>"
    plain = _functions(scripted, function_call="none").json()["choices"][0]
    assert plain["message"]["content"] == scripted.loop.script
    assert plain["finish_reason"] == "stop"
    assert scripted.loop.last_options.grammar is None
    named = _functions(scripted, function_call={"name": "get_time"}).json()["choices"][0]
    assert named["message"]["function_call"]["name"] == "get_time"
    grammar = scripted.loop.last_options.grammar  # the call, in Hermes' tags
    assert grammar.kind == "lark" and "<tool_call>" in grammar.text and "get_time" in grammar.text
    unknown = _functions(scripted, function_call={"name": "nothing"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"
    both = _functions(scripted, tools=[TOOL])
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
