"""Tools through the openai client: the tools reach the chat template, and a reply with
tool calls in the template's tags comes back as OpenAI's ``tool_calls``, streamed or not.

The reading is tested on scripted replies (`serve_helpers.ScriptedLoop`).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from serve_helpers import (
    AGENT_TEMPLATE,
    MODEL_NAME,
    TIME_CALL,
    WEATHER_CALL,
    CharTokenizer,
    HermesChat,
    ScriptedLoop,
    agent_server,
    serving,
    word_tokenizer,
)

pytest.importorskip("openai")
pytest.importorskip("fastapi")

TOOL = {
    "type": "function",
    "function": {
        "name": "w42",
        "description": "the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = [{"role": "user", "content": "w3 w4"}]
WEATHER, TIME = WEATHER_CALL, TIME_CALL


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with agent_server(tmp_path_factory.mktemp("tools")) as running:
        yield running


def test_tools_reach_the_chat_template(agent):
    client = agent.openai()
    rendered = "<|system|> w42 <|user|> w3 w4 <|assistant|>"
    expected = len(word_tokenizer(AGENT_TEMPLATE).encode(rendered, add_special_tokens=False))
    for choice in (None, "auto", "none"):
        extra = {} if choice is None else {"tool_choice": choice}
        answer = client.chat.completions.create(
            model=MODEL_NAME, messages=USER, tools=[TOOL], max_tokens=2, temperature=0, **extra
        )
        assert answer.usage.prompt_tokens == expected


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "w9"}}},
         "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        # a forced call needs a grammar over the tokenizer's bytes; this word-level one
        # has no decoder llguidance can read
        ({"tools": [TOOL], "tool_choice": "required", "max_tokens": 4}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, None),
    ],
)  # fmt: skip
def test_what_tools_cannot_do_is_a_400(agent, body, param):
    with agent.client() as http:
        answer = http.post("/v1/chat/completions",
                           json={"model": MODEL_NAME, "messages": USER, **body})  # fmt: skip
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    if param is not None:
        assert error["param"] == param
    assert "\n" not in error["message"]
    if body.get("tool_choice") == "required" and "tools" in body:
        assert "llguidance cannot read this tokenizer" in error["message"]


@pytest.fixture(scope="module")
def scripted():
    from avmp.serve.app import ServeConfig, create_app

    apps = {}
    for parser in ("auto", "none"):
        config = ServeConfig(model_name=MODEL_NAME, tool_call_parser=parser)
        apps[parser] = create_app(ScriptedLoop(), CharTokenizer(), config, HermesChat())
    with serving(apps["auto"]) as auto, serving(apps["none"]) as plain:
        yield SimpleNamespace(auto=auto, none=plain)


def _ask(server, script: str, stream: bool = False, **fields) -> Any:
    server.loop.script = script
    fields.setdefault("tools", [TOOL])
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=USER, stream=stream, **fields
    )


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls or ()]


def test_a_reply_with_calls_comes_back_as_tool_calls(scripted):
    script = f"Let me look. <tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{TIME}</tool_call>"
    (choice,) = _ask(scripted.auto, script).choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    assert _calls(choice.message.tool_calls) == [("get_weather", {"city": "Zürich"}),
                                                  ("get_time", {})]  # fmt: skip
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    only = _ask(scripted.auto, f"<tool_call>{TIME}</tool_call>").choices[0].message
    assert only.content is None and _calls(only.tool_calls) == [("get_time", {})]
    first = _ask(scripted.auto, script, parallel_tool_calls=False).choices[0].message
    assert _calls(first.tool_calls) == [("get_weather", {"city": "Zürich"})]


@pytest.mark.parametrize(
    "server, script, fields",
    [
        ("auto", "<tool_call>{not json}</tool_call> so", {}),  # malformed: the text
        ("auto", f"<tool_call>{TIME}</tool_call>", {"tool_choice": "none"}),
        ("auto", f"<tool_call>{TIME}</tool_call>", {"tools": None}),
        ("none", f"<tool_call>{TIME}</tool_call>", {}),  # --tool-call-parser none
    ],
)
def test_text_comes_back_as_it_is_where_no_calls_are_read(scripted, server, script, fields):
    (choice,) = _ask(getattr(scripted, server), script, **fields).choices
    assert choice.message.content == script and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_a_streamed_reply_gives_the_same_calls(scripted):
    script = f"Sure. <tool_call>{WEATHER}</tool_call> then <tool_call>{TIME}</tool_call>"
    whole = _ask(scripted.auto, script).choices[0]
    chunks = list(_ask(scripted.auto, script, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [d.index for d in deltas] == [0, 1]
    assert _calls(deltas) == _calls(whole.message.tool_calls)
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert content.split() == ["Sure.", "then"] and whole.message.content == "Sure.  then"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the text before the tag streamed before the call did
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:first_call]).startswith(
        "Sure."
    )
