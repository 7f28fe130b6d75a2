"""The tool-call readers (avmp.serve.tools): each family's tags, several calls, text
around them, malformed bodies, unclosed tags, and streaming: any split of a text gives
the same calls and content as the whole."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmp.serve.tools import SYNTAXES, ParsedCall, ToolCallReader, read_all, tool_syntax

WEATHER = {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}
TIME = {"name": "get_time", "arguments": {}}


def _hermes(*calls: dict) -> str:
    return "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in calls)


def _listed(tag: str, *calls: dict) -> str:
    return f"<{tag}>{json.dumps(list(calls))}</{tag}>"


CASES = {
    "hermes": (_hermes(WEATHER, TIME), [WEATHER, TIME]),
    "nemotron": (_listed("TOOLCALL", WEATHER, TIME), [WEATHER, TIME]),
    "jamba": (_listed("tool_calls", WEATHER), [WEATHER]),
}


def _named(calls: list[ParsedCall]) -> list[dict]:
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]


@pytest.mark.parametrize("family", sorted(CASES))
def test_each_family_reads_its_calls_with_text_around(family):
    text, expected = CASES[family]
    content, calls = read_all(SYNTAXES[family], "Let me check. " + text + " Done.")
    assert _named(calls) == expected
    assert content.split() == ["Let", "me", "check.", "Done."]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)


def test_arguments_are_json_text_and_parameters_are_arguments_too():
    (call,) = read_all(SYNTAXES["hermes"], _hermes({"name": "f", "parameters": {"a": 1}}))[1]
    assert call.arguments == '{"a": 1}'
    (call,) = read_all(SYNTAXES["hermes"], _hermes({"name": "f", "arguments": '{"b": 2}'}))[1]
    assert call.arguments == '{"b": 2}'  # already text: kept as written


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
        '<tool_call>["a list"]</tool_call>',
    ],
)
def test_a_malformed_call_is_content_as_written(text):
    assert read_all(SYNTAXES["hermes"], "a " + text + " b") == ("a " + text + " b", [])


def test_an_unclosed_tag_at_the_end_is_read_as_a_call_if_it_is_one():
    content, calls = read_all(SYNTAXES["hermes"], "x <tool_call>" + json.dumps(TIME))
    assert content == "x " and _named(calls) == [TIME]
    assert read_all(SYNTAXES["hermes"], "x <tool_call>{") == ("x <tool_call>{", [])
    assert read_all(SYNTAXES["hermes"], "x <tool_ca") == ("x <tool_ca", [])  # a held tail


def test_jamba_and_hermes_tags_are_told_apart():
    text = _listed("tool_calls", WEATHER)
    assert read_all(SYNTAXES["hermes"], text) == (text, [])
    assert _named(read_all(SYNTAXES["jamba"], text)[1]) == [WEATHER]


def test_the_parser_is_guessed_from_the_template():
    assert tool_syntax("auto", "{{ '<tool_call>' }}") is SYNTAXES["hermes"]
    assert tool_syntax("auto", "<tool_calls>[...]</tool_calls>") is SYNTAXES["jamba"]
    assert tool_syntax("auto", "<TOOLCALL>") is SYNTAXES["nemotron"]
    assert tool_syntax("auto", "{{ messages }}") is None
    assert tool_syntax("none", "<tool_call>") is None
    assert tool_syntax("jamba", "") is SYNTAXES["jamba"]
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_syntax("llama3_json", "")


def _streamed(family: str, text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    reader = ToolCallReader(SYNTAXES[family])
    bounds = [0, *sorted(cuts), len(text)]
    out = [x for a, b in zip(bounds, bounds[1:], strict=False) for x in reader.add(text[a:b])]
    out += reader.finish()
    content = "".join(x for x in out if isinstance(x, str))
    return content, _named([x for x in out if isinstance(x, ParsedCall)])


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_stream_split_at_every_character_gives_the_same_calls(family):
    text = "Sure <" + CASES[family][0] + "<tool_call>{bad}</tool_call> end"
    whole = read_all(SYNTAXES[family], text)
    expected = (whole[0], _named(whole[1]))
    for cut in range(len(text) + 1):
        assert _streamed(family, text, [cut]) == expected
    assert _streamed(family, text, list(range(len(text)))) == expected  # one character each


@given(st.lists(st.integers(0, 200), max_size=8))
def test_any_split_gives_the_same_calls(cuts):
    text = "a<tool_c " + _hermes(WEATHER) + "b <tool_call>{x</tool_call>" + _hermes(TIME)[:-14]
    whole = read_all(SYNTAXES["hermes"], text)
    assert _streamed("hermes", text, [c % (len(text) + 1) for c in cuts]) == (
        whole[0],
        _named(whole[1]),
    )
    assert len(whole[1]) == 2
