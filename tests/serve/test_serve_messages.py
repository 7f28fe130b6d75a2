"""Chat messages as agents send them: assistant turns with tool calls and no content, tool
answers, names, refusals, the deprecated function role; content parts that are not text
are a 400 naming their type."""

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

from avmp.serve.chat import MistralChat, Rendering, TemplateChat, system_prompt_end
from avmp.serve.protocol import ChatMessage

pytest.importorskip("fastapi")

CALL = {"id": "w9", "type": "function", "function": {"name": "w42", "arguments": '{"x": "w7"}'}}
AGENT_CHAT = [
    {"role": "system", "content": "w1 w2"},
    {"role": "user", "content": "w3", "name": "w4"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "w5", "tool_call_id": "w9"},
    {"role": "assistant", "content": None, "refusal": "w6"},
    {"role": "function", "name": "w42", "content": "w8"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "w10"}, {"type": "text", "text": " w11"}],
    },
]
# what AGENT_TEMPLATE renders for AGENT_CHAT (the "tool" role is not a vocabulary word)
AGENT_PROMPT = (
    "<|system|> w1 w2 <|user|> w3 <|assistant|> <tool_call> w42 w7 </tool_call> "
    "<|tool|> w5 w9 <|assistant|> w6 <|tool|> w8 <|user|> w10 w11 <|assistant|>"
)


PART = "messages.0.content"


def _rendered(chat: list[dict]) -> list[dict]:
    return [ChatMessage.model_validate(m).rendered(i) for i, m in enumerate(chat)]


def test_agent_messages_render_for_the_template() -> None:
    messages = _rendered(AGENT_CHAT)
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"x": "w7"}  # parsed
    assert messages[2]["content"] == "" and messages[4]["content"] == "w6"
    assert messages[5] == {"role": "tool", "content": "w8", "name": "w42"}
    assert messages[1]["name"] == "w4" and "name" not in messages[0]
    legacy = ChatMessage(role="assistant", function_call={"name": "w42", "arguments": "[1]"})
    call = legacy.rendered(3)["tool_calls"][0]
    assert call["id"] == "call_3" and call["function"]["arguments"] == "[1]"  # not an object
    tokenizer = word_tokenizer(AGENT_TEMPLATE)
    prompt = TemplateChat(tokenizer).encode(messages)
    assert prompt == tokenizer.encode(AGENT_PROMPT, add_special_tokens=False)


def test_the_system_prompt_ends_before_agent_turns() -> None:
    encoder = TemplateChat(word_tokenizer(AGENT_TEMPLATE))
    messages = _rendered(AGENT_CHAT)
    # "<|system|> w1 w2 <|user|>": the user's text differs from the stand-ins
    assert system_prompt_end(encoder, messages, encoder.encode(messages)) == 4


def test_the_demo_encoding_refuses_tool_turns_clearly() -> None:
    pytest.importorskip("mistral_common")
    chat = MistralChat()
    assert chat.encode(_rendered(AGENT_CHAT[1:2]))  # a user's name is dropped, not an error
    with pytest.raises(ValueError, match="no tools"):
        chat.encode(_rendered(AGENT_CHAT[1:4]))
    tools = [{"type": "function", "function": {"name": "w42"}}]
    with pytest.raises(ValueError, match="no tools"):
        chat.encode(_rendered(AGENT_CHAT[1:2]), Rendering(tools=tools))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("agent") / "ckpt", AGENT_TEMPLATE)
    with serving(make_app(make_engine(path), model_path=path)) as running:
        yield running


def test_an_agent_conversation_through_the_openai_client(server) -> None:
    answer = server.openai().chat.completions.create(
        model=MODEL_NAME, messages=AGENT_CHAT, max_tokens=2, temperature=0
    )
    expected = word_tokenizer(AGENT_TEMPLATE).encode(AGENT_PROMPT, add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(
    "part, param, words",
    [
        ({"type": "image_url", "image_url": {"url": "data:,"}}, PART, "'image_url'"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, PART,
         "'input_audio'"),
        ({"type": "file", "file": {"file_id": "f"}}, PART, "'file'"),
        ({"type": "text", "text": "w1", "txt": "w2"}, None, "'txt'"),
        ({"type": "text"}, None, "'text' field"),
    ],
)  # fmt: skip
def test_parts_that_are_not_text_are_refused_by_type(server, part, param, words) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": [part]}]}
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param and "text only" in error["message"]


def test_unknown_message_fields_stay_a_400(server) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "contents": "w1"}]}
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and "contents" in answer.json()["error"]["message"]
