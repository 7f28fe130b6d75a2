"""Structured outputs through the OpenAI client: ``response_format`` (JSON object, JSON
schema, the SDK's pydantic ``parse``), vLLM's ``structured_outputs`` and ``guided_*``
fields on chat and completions, the Responses API's ``text.format``, and forced tool
calls (``tool_choice`` required or named) in Hermes' tags, on a tiny random model with a
byte-level tokenizer; and the 400s for what cannot be done."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from serve_helpers import MODEL_NAME, make_app, make_engine, serving, write_checkpoint

from grammar_helpers import MODEL_VOCAB, byte_tokenizer, satisfies

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

# Hermes' tags in the template make `auto` pick the hermes tool syntax
TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    " <tool_call>\n{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 4},
    },
    "required": ["colour", "ok", "name"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Lima"]}, "metric": {"type": "boolean"}},
            "required": ["city", "metric"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "Tell me."}]
MAX_TOKENS = 120  # more than any bounded answer here takes


class Paint(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]
    glossy: bool
    code: str = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="avmp-serve-structured-") as root:
        path = write_checkpoint(
            Path(root), TEMPLATE, tokenizer=byte_tokenizer(), vocab_size=MODEL_VOCAB
        )
        engine = make_engine(path, max_model_len=512)
        with serving(make_app(engine, model_path=path)) as running:
            yield running


def chat(server: Any, **fields: Any) -> Any:
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=USER, **{"max_tokens": MAX_TOKENS, **fields}
    )


def streamed_chat(server: Any, **fields: Any) -> tuple[str, str, list[Any]]:
    """The streamed reply's content, finish reason and tool-call deltas."""
    chunks = list(chat(server, stream=True, **fields))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reason = next(c.choices[0].finish_reason for c in chunks[::-1] if c.choices[0].finish_reason)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    return content, reason, calls


PAINT = {"name": "paint", "schema": SCHEMA, "strict": True}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": PAINT}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_json_schema_reply_satisfies_it(server: Any, seed: int) -> None:
    answer = chat(server, response_format=JSON_SCHEMA_FORMAT, seed=seed)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert satisfies(json.loads(choice.message.content), SCHEMA), choice.message.content
    content, reason, _ = streamed_chat(server, response_format=JSON_SCHEMA_FORMAT, seed=seed)
    assert (content, reason) == (choice.message.content, "stop")


def test_a_json_object_reply_is_an_object(server: Any) -> None:
    """Any object: unbounded, so a random model may run out of tokens; what it wrote is
    an object's beginning, and a finished one parses."""
    for seed in range(3):
        answer = chat(server, response_format={"type": "json_object"}, seed=seed)
        text = answer.choices[0].message.content
        assert text.startswith("{"), text
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_the_sdk_parses_into_a_pydantic_model(server: Any) -> None:
    completion = server.openai().chat.completions.parse(
        model=MODEL_NAME, messages=USER, max_tokens=MAX_TOKENS, response_format=Paint, seed=4
    )
    paint = completion.choices[0].message.parsed
    assert isinstance(paint, Paint) and len(paint.code) <= 3


def test_n_choices_each_satisfy_the_grammar(server: Any) -> None:
    choices = ["alpha", "beta", "gamma delta"]
    answer = chat(server, n=4, seed=7, extra_body={"structured_outputs": {"choice": choices}})
    assert len(answer.choices) == 4
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in answer.choices)


@pytest.mark.parametrize(
    "fields, check",
    [
        ({"structured_outputs": {"regex": "[a-c]{2,5}"}}, r"[a-c]{2,5}"),
        ({"guided_regex": "(yes|no)!"}, r"(yes|no)!"),
        ({"structured_outputs": {"choice": ["on", "off"]}}, r"on|off"),
        ({"guided_choice": ["left", "right"]}, r"left|right"),
        ({"structured_outputs": {"grammar": 'start: "<" ("x" | "yy") ">"'}}, r"<(x|yy)>"),
        ({"guided_grammar": 'root ::= "[" ("a" | "bc") "]"'}, r"\[(a|bc)\]"),  # GBNF
    ],
)  # fmt: skip
def test_vllm_fields_on_chat_and_completions(server: Any, fields: dict, check: str) -> None:
    answer = chat(server, seed=1, extra_body=fields)
    assert re.fullmatch(check, answer.choices[0].message.content)
    completion = server.openai().completions.create(
        model=MODEL_NAME, prompt="Say:", max_tokens=MAX_TOKENS, seed=2, extra_body=fields
    )
    assert re.fullmatch(check, completion.choices[0].text), completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop"


def test_guided_json_on_completions_streamed(server: Any) -> None:
    stream = server.openai().completions.create(
        model=MODEL_NAME, prompt="Paint:", max_tokens=MAX_TOKENS, seed=3, stream=True,
        extra_body={"guided_json": SCHEMA},
    )  # fmt: skip
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert satisfies(json.loads(text), SCHEMA), text


def test_responses_text_format(server: Any) -> None:
    client = server.openai()
    fmt = {"type": "json_schema", "name": "paint", "schema": SCHEMA, "strict": True}
    answer = client.responses.create(
        model=MODEL_NAME, input="Paint?", max_output_tokens=MAX_TOKENS, text={"format": fmt}
    )
    assert satisfies(json.loads(answer.output_text), SCHEMA), answer.output_text
    assert answer.text.format.type == "json_schema"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_a_forced_tool_call_follows_the_tools_schema(
    server: Any, tool_choice: Any, stream: bool
) -> None:
    fields = dict(tools=[WEATHER, TIME], tool_choice=tool_choice, parallel_tool_calls=False,
                  seed=5)  # fmt: skip
    if stream:
        content, reason, deltas = streamed_chat(server, **fields)
        names = [d.function.name for d in deltas if d.function.name]
        arguments = ["".join(d.function.arguments or "" for d in deltas)]
    else:
        message = chat(server, **fields).choices[0].message
        reason = chat(server, **fields).choices[0].finish_reason
        content = message.content or ""
        names = [call.function.name for call in message.tool_calls]
        arguments = [call.function.arguments for call in message.tool_calls]
    assert reason == "tool_calls" and content.strip() == ""
    assert len(names) == 1
    if isinstance(tool_choice, dict):
        assert names == ["get_time"]
    tool = {"get_weather": WEATHER, "get_time": TIME}[names[0]]
    assert satisfies(json.loads(arguments[0]), tool["function"]["parameters"]), arguments


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
         "guided_regex"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
         "structured_outputs.choice"),
        ({"response_format": {"type": "json_object"}, "tools": [TIME],
          "tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"extra_body": {"structured_outputs": {"structural_tag": "x"}}},
         "structured_outputs.structural_tag"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        # compiled before the request is queued: llguidance's message, on one line
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nothing"}}}},
         "response_format"),
    ],
)  # fmt: skip
def test_what_cannot_be_done_is_a_one_line_400(server: Any, fields: dict, param: Any) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            chat(server, stream=stream, **fields)
        error = raised.value.body
        assert error["param"] == param and "\n" not in error["message"], error
        assert error["type"] == "invalid_request_error"
    assert chat(server, max_tokens=2).choices[0].message.content is not None  # still serving


def test_a_forced_call_through_the_responses_api(server: Any) -> None:
    flat = {"type": "function", **WEATHER["function"]}
    answer = server.openai().responses.create(
        model=MODEL_NAME, input="Weather?", max_output_tokens=MAX_TOKENS, tools=[flat],
        tool_choice={"type": "function", "name": "get_weather"},
    )  # fmt: skip
    calls = [item for item in answer.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    assert satisfies(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("syntax_name", ["hermes", "nemotron", "jamba"])
def test_each_tool_syntax_grammar_takes_what_its_reader_reads(syntax_name: str) -> None:
    """The grammar of a forced call accepts a call written in the family's syntax (one
    call; a list for the listed ones), which the family's reader reads back, and refuses
    a call of another tool or with arguments outside the schema."""
    from types import SimpleNamespace

    from avmp.engine.grammar import GrammarCompiler
    from avmp.serve.structured import tool_call_spec
    from avmp.serve.tools import SYNTAXES, read_all

    syntax = SYNTAXES[syntax_name]
    tokenizer = byte_tokenizer()
    compiler = GrammarCompiler(SimpleNamespace(_tok=tokenizer), 2, MODEL_VOCAB)
    spec = tool_call_spec(syntax, [WEATHER["function"], TIME["function"]], single=True)
    body = '{"name": "get_time", "arguments": {"zone": "CET"}}'
    inside = f"[{body}]" if syntax.listed else f"\n{body}\n"
    good = f"{syntax.open}{inside}{syntax.close}"
    matcher = compiler.matcher(spec)
    assert matcher.consume_tokens(tokenizer.encode(good)) and matcher.is_stopped()
    _, calls = read_all(syntax, good)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "CET"})]
    for bad in (good.replace("CET", "PST"), good.replace("get_time", "get_date")):
        assert not compiler.matcher(spec).consume_tokens(tokenizer.encode(bad))
