"""Tool calls out of generated text: the tags a model family writes its calls in, and a
reader that finds them as the text streams.

A checkpoint's chat template tells the model how to call a tool, and the model answers
in that template's syntax: Hermes' ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
one call per tag (Qwen3, Qwen3-Next, Granite-4.0, Falcon-H1), or a JSON list of calls in one
tag, ``<TOOLCALL>[...]</TOOLCALL>`` (Nemotron-H) and ``<tool_calls>[...]</tool_calls>``
(Jamba-1.5). vLLM's tool parsers of the same names read the same tags.

The reader passes the text outside tags on as content at once, except a tail that could
still begin an opening tag; once a tag opens it holds everything until the tag closes (or
the text ends) and then gives the calls, or, when the body is not the JSON a call needs,
the whole tag as content. Any split of a text into pieces gives the same calls and the
same content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

TOOL_CALL_PARSERS = ("auto", "hermes", "nemotron", "jamba", "none")


@dataclass(frozen=True)
class ToolSyntax:
    """How one family writes tool calls: between ``open`` and ``close``, one JSON object
    (``name`` and ``arguments``) or, with ``listed``, a JSON list of them."""

    name: str
    open: str
    close: str
    listed: bool


SYNTAXES = {
    "hermes": ToolSyntax("hermes", "<tool_call>", "</tool_call>", listed=False),
    "nemotron": ToolSyntax("nemotron", "<TOOLCALL>", "</TOOLCALL>", listed=True),
    "jamba": ToolSyntax("jamba", "<tool_calls>", "</tool_calls>", listed=True),
}


def tool_syntax(parser: str, template: str) -> ToolSyntax | None:
    """The syntax ``parser`` (`TOOL_CALL_PARSERS`) names; ``auto``: the one whose opening
    tag the chat template's text contains (None if none does); ``none``: None.

    Raises:
        ValueError: an unknown parser name.
    """
    if parser not in TOOL_CALL_PARSERS:
        names = ", ".join(TOOL_CALL_PARSERS)
        raise ValueError(f"unknown tool-call parser {parser!r}; one of {names}")
    if parser == "none":
        return None
    if parser != "auto":
        return SYNTAXES[parser]
    # "<tool_call>" is not a part of "<tool_calls>": the order does not matter
    return next((s for s in SYNTAXES.values() if s.open in template), None)


@dataclass(frozen=True)
class ParsedCall:
    """One call the model made: an id of OpenAI's shape, the function's name and its
    arguments as JSON text."""

    id: str
    name: str
    arguments: str


def _new_call(name: str, arguments: Any) -> ParsedCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name, text)


def parse_calls(syntax: ToolSyntax, body: str) -> list[ParsedCall] | None:
    """The calls in one tag's body, or None when it is not what ``syntax`` writes (not
    JSON, a call without a string ``name``, arguments that are not an object or text)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if syntax.listed and isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        # some models write "parameters" where the template says "arguments"
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, (dict, str)):
            return None
        calls.append(_new_call(item["name"], arguments))
    return calls


class ToolCallReader:
    """One choice's text split into content and tool calls as it streams.

    ``add`` and ``finish`` return what can be given out now, in order: pieces of content
    (str) and calls (`ParsedCall`).
    """

    def __init__(self, syntax: ToolSyntax) -> None:
        self.syntax = syntax
        self.num_calls = 0
        self._text = ""  # not given out yet: a tail outside a tag, or an open tag's text
        self._inside = False

    def add(self, text: str) -> list[str | ParsedCall]:
        self._text += text
        out: list[str | ParsedCall] = []
        while True:
            if not self._inside:
                start = self._text.find(self.syntax.open)
                if start < 0:
                    keep = _partial_tag(self._text, self.syntax.open)
                    self._emit(out, self._text[: len(self._text) - keep])
                    self._text = self._text[len(self._text) - keep :]
                    return out
                self._emit(out, self._text[:start])
                self._text, self._inside = self._text[start:], True
            end = self._text.find(self.syntax.close)
            if end < 0:
                return out
            end += len(self.syntax.close)
            self._close(out, self._text[:end])
            self._text, self._inside = self._text[end:], False

    def finish(self) -> list[str | ParsedCall]:
        """What is left once the text has ended: an unclosed tag is read as if closed
        there (models sometimes end on the call), a held tail is content."""
        out: list[str | ParsedCall] = []
        if self._inside:
            self._close(out, self._text, closed=False)
        else:
            self._emit(out, self._text)
        self._text, self._inside = "", False
        return out

    def _close(self, out: list[str | ParsedCall], tag: str, closed: bool = True) -> None:
        end = len(tag) - (len(self.syntax.close) if closed else 0)
        body = tag[len(self.syntax.open) : end]
        calls = parse_calls(self.syntax, body)
        if calls is None:  # not a call after all: the model's text, as it wrote it
            self._emit(out, tag)
            return
        out.extend(calls)
        self.num_calls += len(calls)

    @staticmethod
    def _emit(out: list[str | ParsedCall], text: str) -> None:
        if text:
            out.append(text)


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` begin ``tag`` (0 if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def read_all(syntax: ToolSyntax, text: str) -> tuple[str, list[ParsedCall]]:
    """A whole text's content (the text outside the calls' tags) and calls."""
    reader = ToolCallReader(syntax)
    out = reader.add(text) + reader.finish()
    content = "".join(x for x in out if isinstance(x, str))
    return content, [x for x in out if isinstance(x, ParsedCall)]
