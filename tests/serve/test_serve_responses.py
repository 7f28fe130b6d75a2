"""OpenAI's Responses API through the openai client: answers on the chat path (the same
text and prompt as the chat completion of the same conversation), streamed as the typed
events the SDK parses, tool calls as ``function_call`` items, and OpenAI's 400s.

Every body and event is also validated against the SDK's own models
(``openai.types.responses``), since the client itself builds them unchecked.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from serve_helpers import (
    MODEL_NAME,
    TIME_CALL,
    WEATHER_CALL,
    agent_server,
    scripted_app,
    serving,
)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "w42", "description": "the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip
WEATHER, TIME = WEATHER_CALL, TIME_CALL


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with agent_server(tmp_path_factory.mktemp("responses")) as running:
        yield running


@pytest.fixture(scope="module")
def scripted():
    app, loop, chat = scripted_app()
    with serving(app) as running:
        yield SimpleNamespace(server=running, loop=loop, chat=chat)


def _raw(server, body: dict) -> Any:
    """The JSON answer of a POST /v1/responses (non-streamed)."""
    with server.client() as http:
        return http.post("/v1/responses", json={"model": MODEL_NAME, **body})


def _validated(body: dict) -> Any:
    return Response.model_validate(body)


def _stream(server, **fields) -> list[Any]:
    """The events of a streamed response, each validated by the SDK's event models."""
    events = list(server.openai().responses.create(model=MODEL_NAME, stream=True, **fields))
    for event in events:
        EVENTS.validate_python(event.model_dump(mode="json", exclude_unset=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _greedy_chat(server, messages, max_tokens: int) -> Any:
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0
    )


def test_a_response_is_the_chat_completion_of_the_same_conversation(agent):
    fields = dict(instructions="w7 w8", input="w3 w4", max_output_tokens=6, temperature=0)
    answer = agent.openai().responses.create(model=MODEL_NAME, **fields)
    chat = _greedy_chat(agent, [{"role": "system", "content": "w7 w8"},
                                {"role": "user", "content": "w3 w4"}], 6)  # fmt: skip
    assert answer.output_text == chat.choices[0].message.content
    assert answer.id.startswith("resp_") and answer.object == "response"
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.output_tokens == chat.usage.completion_tokens
    assert answer.usage.total_tokens == chat.usage.total_tokens
    assert answer.instructions == "w7 w8" and answer.temperature == 0
    (message,) = answer.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    raw = _raw(agent, fields)
    assert raw.status_code == 200 and "output_text" not in raw.json()
    _validated(raw.json())


def test_a_streamed_response_adds_up_to_the_whole_one(agent):
    fields = dict(input="w5 w6 w7", max_output_tokens=5, temperature=0)
    whole = agent.openai().responses.create(model=MODEL_NAME, **fields)
    events = _stream(agent, **fields)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert "".join(deltas) == final.output_text == whole.output_text
    assert events[-3].part.text == whole.output_text
    assert final.id == events[0].response.id and final.output[0].id == events[2].item.id
    assert final.usage.output_tokens == whole.usage.output_tokens == 5


def test_max_output_tokens_makes_a_response_incomplete(agent):
    answer = agent.openai().responses.create(
        model=MODEL_NAME, input="w3", max_output_tokens=3, temperature=0
    )
    assert answer.status == "incomplete"
    assert answer.incomplete_details.reason == "max_output_tokens"
    assert answer.output[0].status == "incomplete" and answer.usage.output_tokens == 3


def test_a_multi_turn_input_list_renders_as_the_chat_does(agent):
    items = [
        {"role": "developer", "content": "w9"},
        {"role": "user", "content": [{"type": "input_text", "text": "w3 w4"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "w5", "annotations": []}]},
        {"role": "user", "content": "w6"},
    ]  # fmt: skip
    messages = [
        {"role": "system", "content": "w9"}, {"role": "user", "content": "w3 w4"},
        {"role": "assistant", "content": "w5"}, {"role": "user", "content": "w6"},
    ]  # fmt: skip
    answer = agent.openai().responses.create(
        model=MODEL_NAME, input=items, max_output_tokens=4, temperature=0
    )
    chat = _greedy_chat(agent, messages, 4)
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_a_tool_loop_maps_onto_chat_messages_and_tools(scripted):
    scripted.loop.script = "ok"
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                               "text": "Let me look."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Bern"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}]},
    ]  # fmt: skip
    answer = scripted.server.openai().responses.create(
        model=MODEL_NAME, instructions="be brief", input=items, tools=[TOOL]
    )
    assert answer.output_text == "ok" and answer.tools[0].name == "w42"
    assert scripted.chat.last_messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Bern"}}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_2"},
    ]  # fmt: skip
    assert scripted.chat.last_rendering.tools == [{"type": "function", "function": {
        k: v for k, v in TOOL.items() if k != "type"}}]  # fmt: skip


def test_a_reply_with_calls_gives_function_call_items(scripted):
    scripted.loop.script = (f"Let me look. <tool_call>\n{WEATHER}\n</tool_call>\n"
                            f"<tool_call>{TIME}</tool_call>")  # fmt: skip
    client = scripted.server.openai()
    answer = client.responses.create(model=MODEL_NAME, input="weather?", tools=[TOOL])
    assert answer.status == "completed"
    message, *calls = answer.output
    assert message.type == "message" and answer.output_text == "Let me look."
    assert [(c.type, c.name, json.loads(c.arguments)) for c in calls] == [
        ("function_call", "get_weather", {"city": "Zürich"}),
        ("function_call", "get_time", {}),
    ]
    assert all(c.call_id.startswith("call_") and c.id.startswith("fc_") for c in calls)
    _validated(_raw(scripted.server, {"input": "weather?", "tools": [TOOL]}).json())
    events = _stream(scripted.server, input="weather?", tools=[TOOL])
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [(i.type, getattr(i, "name", None)) for i in final.output] == [
        ("message", None),
        ("function_call", "get_weather"),
        ("function_call", "get_time"),
    ]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.id for i in done] == [i.id for i in final.output]
    arguments = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == [c.arguments for c in final.output[1:]]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "Let me look."
    with client.responses.stream(model=MODEL_NAME, input="weather?", tools=[TOOL]) as stream:
        helped = stream.get_final_response()  # the SDK's own accumulation of the events
    assert helped.output_text == "Let me look." and len(helped.output) == 3


def test_a_reply_of_calls_alone_has_no_message(scripted):
    scripted.loop.script = f"\n<tool_call>{TIME}</tool_call>\n"
    client = scripted.server.openai()
    answer = client.responses.create(model=MODEL_NAME, input="time?", tools=[TOOL])
    assert [i.type for i in answer.output] == ["function_call"]
    events = _stream(scripted.server, input="time?", tools=[TOOL])
    assert not [e for e in events if e.type.startswith("response.output_text")]
    assert [i.type for i in events[-1].response.output] == ["function_call"]
    one = client.responses.create(model=MODEL_NAME, input="x", tools=[TOOL],
                                  parallel_tool_calls=False)  # fmt: skip
    assert len(one.output) == 1 and one.parallel_tool_calls is False


def test_fields_with_no_effect_are_accepted(scripted):
    scripted.loop.script = "fine"
    answer = scripted.server.openai().responses.create(
        model=MODEL_NAME, input="hi", store=False, metadata={"k": "v"}, user="u1",
        text={"format": {"type": "text"}}, reasoning={"effort": "low"}, truncation="disabled",
        include=[], tool_choice="none", tools=[TOOL], parallel_tool_calls=True, top_p=0.9,
    )  # fmt: skip
    assert answer.output_text == "fine" and answer.metadata == {"k": "v"}
    assert scripted.chat.last_rendering.kwargs == {"reasoning_effort": "low"}
    assert scripted.loop.last_options.top_p == 0.9


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "input.0.content"),
        ({"input": [{"type": "function_call_output", "call_id": "c",
                     "output": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.output"),
        ({"input": []}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "extra_body": {"max_tokens": 5}}, "max_tokens"),
    ],
)  # fmt: skip
def test_what_cannot_be_done_is_a_400_in_openai_shape(scripted, body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        scripted.server.openai().responses.create(model=MODEL_NAME, **body)
    error = raised.value.body
    assert raised.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_another_model_is_a_404(scripted):
    with pytest.raises(openai.NotFoundError) as raised:
        scripted.server.openai().responses.create(model="gpt-4o", input="x")
    assert raised.value.body["code"] == "model_not_found"
