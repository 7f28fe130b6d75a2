"""Structured outputs: the request fields that hold a reply to a grammar, read into the
engine's `GrammarSpec` (`avmp.engine.grammar`, llguidance underneath).

Accepted, one of them per request (two at once are a 400 naming both):
OpenAI's ``response_format`` (``json_object``: any JSON object; ``json_schema``: its
``json_schema.schema``), vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``,
``grammar`` in Lark or GBNF, ``json_object``) and its older ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar``; and a forced tool call:
``tool_choice`` ``required`` or a named function becomes a grammar that writes one call
in the family's tool syntax (`avmp.serve.tools.ToolSyntax`) whose arguments follow the
tool's ``parameters`` schema. The Responses API's ``text.format`` arrives here as chat's
``response_format`` (`avmp.serve.responses_api`).
"""

from __future__ import annotations

import json
from typing import Any

from avmp.engine.grammar import JSON_LAYOUT, GrammarSpec
from avmp.serve.errors import APIError
from avmp.serve.tools import ToolSyntax

ANY_OBJECT = {"type": "object"}


def _json_spec(schema: Any, param: str) -> GrammarSpec:
    """A JSON schema given as an object, a boolean or JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise APIError(400, f"{param} is not valid JSON: {error}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema (an object)", param=param)
    return GrammarSpec("json", json.dumps(schema))


def _choice_spec(choices: Any, param: str) -> GrammarSpec:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise APIError(400, f"{param} must be a non-empty list of strings", param=param)
    return GrammarSpec.choice(choices)


def _text_spec(kind: str, text: Any, param: str) -> GrammarSpec:
    if not isinstance(text, str) or not text:
        raise APIError(400, f"{param} must be a non-empty string", param=param)
    return GrammarSpec(kind, text)


def response_format_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's ``response_format``: None for ``text`` (or none given).

    Raises:
        APIError: 400 for an unknown type or a ``json_schema`` without its schema.
    """
    if response_format is None:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_schema(ANY_OBJECT)
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format")  # fmt: skip
        return _json_spec(inner["schema"], "response_format.json_schema.schema")
    raise APIError(400, f"response_format type must be text, json_object or json_schema, "
                   f"got {kind!r}", param="response_format")  # fmt: skip


def structured_outputs_specs(outputs: dict[str, Any]) -> list[tuple[str, GrammarSpec]]:
    """vLLM's ``structured_outputs`` object: (its field, the spec) per field set.

    Raises:
        APIError: 400 for a field avmp serve does not take, or a bad value.
    """
    known = {"json", "regex", "choice", "grammar", "json_object", "disable_fallback",
             "disable_any_whitespace", "disable_additional_properties"}  # fmt: skip
    unknown = sorted(set(outputs) - known)
    if unknown:
        raise APIError(400, f"structured_outputs.{unknown[0]} is not supported by avmp serve",
                       param=f"structured_outputs.{unknown[0]}")  # fmt: skip
    found = []
    for name, value in outputs.items():
        param = f"structured_outputs.{name}"
        if value is None or name.startswith("disable_"):  # layout hints: ours is compact
            continue
        if name == "json":
            found.append((param, _json_spec(value, param)))
        elif name == "json_object":
            if value is True:
                found.append((param, GrammarSpec.json_schema(ANY_OBJECT)))
        elif name == "choice":
            found.append((param, _choice_spec(value, param)))
        else:
            found.append((param, _text_spec("lark" if name == "grammar" else name, value, param)))
    return found


def requested_grammar(
    body: Any, tool_spec: GrammarSpec | None = None
) -> tuple[str, GrammarSpec] | None:
    """The one grammar a request asks for and the field that asks, or None;
    ``tool_spec``: a forced tool call's (`tool_call_spec`).

    Raises:
        APIError: 400 for two at once (naming both), or a malformed one.
    """
    found: list[tuple[str, GrammarSpec]] = []
    spec = response_format_spec(getattr(body, "response_format", None))
    if spec is not None:
        found.append(("response_format", spec))
    if body.structured_outputs is not None:
        found += structured_outputs_specs(body.structured_outputs)
    if body.guided_json is not None:
        found.append(("guided_json", _json_spec(body.guided_json, "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", _text_spec("regex", body.guided_regex, "guided_regex")))
    if body.guided_choice is not None:
        found.append(("guided_choice", _choice_spec(body.guided_choice, "guided_choice")))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", _text_spec("lark", body.guided_grammar,
                                                   "guided_grammar")))  # fmt: skip
    if tool_spec is not None:
        found.append(("tool_choice", tool_spec))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise APIError(400, f"{first} and {second} both constrain the output: give one",
                       param=second)  # fmt: skip
    return found[0] if found else None


def forced_tools(tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]] | None:
    """The functions (OpenAI's ``function`` objects) a ``tool_choice`` forces a call of:
    all for ``required``, the named one for a named choice (chat's
    ``{"type": "function", "function": {"name": ...}}`` or the Responses API's
    ``{"type": "function", "name": ...}``); None when the model may answer in text.

    Raises:
        APIError: 400 for a choice that names no given tool, or is not of these shapes.
    """
    if tool_choice in (None, "none", "auto"):
        return None
    functions = [tool["function"] for tool in tools]
    if tool_choice == "required":
        return functions
    name = None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        inner = tool_choice.get("function")
        name = inner.get("name") if isinstance(inner, dict) else tool_choice.get("name")
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be none, auto, required or "
                       '{"type": "function", "function": {"name": ...}}',
                       param="tool_choice")  # fmt: skip
    chosen = [f for f in functions if f.get("name") == name]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                       param="tool_choice")  # fmt: skip
    return chosen


def tool_call_spec(
    syntax: ToolSyntax, functions: list[dict[str, Any]], single: bool
) -> GrammarSpec:
    """A Lark grammar that writes calls of ``functions`` in ``syntax``: the family's
    opening tag, the call (``{"name": ..., "arguments": {...}}``, arguments per the
    function's ``parameters``; a JSON list of such calls for the listed syntaxes), the
    closing tag. One call when ``single``, else one or more."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or ANY_OBJECT,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if syntax.listed:
        call = {
            "type": "array",
            "items": call,
            "minItems": 1,
            **({"maxItems": 1} if single else {}),
        }
    call = {**call, "x-guidance": JSON_LAYOUT}
    # Hermes' templates put each call on its own line between the tags
    inside = "" if syntax.listed else "\n"
    tag = f"{json.dumps(syntax.open + inside)} call {json.dumps(inside + syntax.close)}"
    repeat = "" if single or syntax.listed else ' ("\\n" tag)*'
    lark = f"start: tag{repeat}\ntag: {tag}\ncall: %json {json.dumps(call)}\n"
    return GrammarSpec("lark", lark)
