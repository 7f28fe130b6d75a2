"""OpenAI's Responses API (``POST /v1/responses``) on the chat path.

A request's ``instructions`` and ``input`` become chat messages (a system message first;
message items as they are; ``function_call`` items as an assistant's tool calls and
``function_call_output`` items as tool messages, so an agent's tool loop renders as in
chat) and its fields a `ChatCompletionRequest`: the chat template, the tools and the
sampling are those of ``/v1/chat/completions``.

The answer is a ``response`` object: one ``message`` item with the text outside tool
calls (left out when the model only called tools; with calls, trailing whitespace is
dropped), then a ``function_call`` item per call. Streamed, it is the typed events the
openai SDK parses, each with its ``sequence_number``: the text as ``output_text.delta``
events while it comes, each call whole once the text is done, and ``response.completed``
(``response.incomplete`` when it stopped at ``max_output_tokens`` or was aborted) with
the whole response last. Nothing is stored: ``store`` is accepted and ignored, and what
needs a stored response (``previous_response_id``, ``conversation``) is a 400.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from avmp.serve.errors import APIError
from avmp.serve.protocol import ChatCompletionRequest, _Request, now_s
from avmp.serve.responses import Piece, sse_event, until_error
from avmp.serve.tools import ParsedCall

# -- requests -------------------------------------------------------------------------


TEXT_PARTS = ("input_text", "output_text", "refusal")


class InputPart(BaseModel):
    """A part of a message's content: ``input_text``, or an earlier answer's
    ``output_text`` (its annotations and log-probabilities are not read) or ``refusal``.
    Parts of other types (images, files, audio) are read far enough to name them in the
    400 that refuses them (`ResponsesRequest.messages`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None

    @model_validator(mode="after")
    def _text_parts_are_exact(self) -> InputPart:
        if self.type in TEXT_PARTS:
            field = "refusal" if self.type == "refusal" else "text"
            if getattr(self, field) is None:
                raise ValueError(f"a {self.type!r} part needs its {field!r} field")
            if self.model_extra:
                raise ValueError(f"unknown field {next(iter(self.model_extra))!r} in a "
                                 f"{self.type!r} part")  # fmt: skip
        return self

    def rendered(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


def _text(content: str | list[InputPart], where: str) -> str:
    """The text of a message's content (``where``: its place, for the 400 that refuses a
    part that is not text)."""
    if isinstance(content, str):
        return content
    for part in content:
        if part.type not in TEXT_PARTS:
            why = f"{where} has a content part of type {part.type!r}, but this model takes"
            raise APIError(400, why + " text only", param=where)
    return "".join(part.rendered() for part in content)


class MessageItem(_Request):
    """A message of the conversation (``type`` may be left out, as the SDK's easy form)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(_Request):
    """A tool call of an earlier answer, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Request):
    """What the client's tool returned for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


def _item_type(item: Any) -> str | None:
    if isinstance(item, dict):
        return str(item.get("type", "message"))
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="input_item_type",
        custom_error_message="an input item is a message, function_call or "
        "function_call_output; avmp serve takes no other",
    ),
]


class FunctionTool(_Request):
    """A function the model may call, in the Responses shape (flat, not nested under
    ``function`` as in chat)."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat(self) -> dict[str, Any]:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class TextConfig(_Request):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ReasoningConfig(_Request):
    """``effort`` reaches the chat template as chat's ``reasoning_effort`` does; a
    summary is refused, since no reasoning item is ever produced."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Request):
    """``POST /v1/responses``."""

    null_is_default: ClassVar[frozenset[str]] = frozenset({"stream"})
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # OpenAI's obfuscation padding: not needed
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # accepted and ignored: nothing is stored
    user: str | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to something avmp serve cannot do, and why; or None."""
        stateless = "avmp serve keeps no responses: send the whole conversation as input"
        text_format = ((self.text and self.text.format) or {}).get("type", "text")
        checks = [
            ("previous_response_id", self.previous_response_id is not None, stateless),
            ("conversation", self.conversation is not None, stateless),
            ("prompt", self.prompt is not None, "stored prompts need a store: send the input"),
            ("background", bool(self.background), "a response is answered while you wait"),
            ("truncation", self.truncation == "auto", "only 'disabled' (a prompt too long is a "
             "400)"),
            ("include", bool(self.include), "nothing can be included: no reasoning items, "
             "tool results or log-probabilities are produced"),
            ("text", text_format not in ("text", "json_object", "json_schema"),
             "formats are text, json_object and json_schema"),
            ("text", self.text is not None and self.text.verbosity not in (None, "medium"),
             "only verbosity 'medium'"),
            ("reasoning", self.reasoning is not None and (self.reasoning.summary is not None
             or self.reasoning.generate_summary is not None), "no reasoning summaries"),
            ("max_tool_calls", self.max_tool_calls is not None, "use parallel_tool_calls: "
             "false for one call at most"),
            ("top_logprobs", bool(self.top_logprobs), "no log-probabilities here: use "
             "/v1/chat/completions"),
        ]  # fmt: skip
        return next(((name, why) for name, bad, why in checks if bad), None)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (`avmp.serve.protocol.ChatMessage` fields):
        ``instructions`` as a system message first; a ``function_call`` joins the
        assistant message before it (parallel calls are one message) or opens one.

        Raises:
            APIError: 400 for no items, or a content part that is not text.
        """
        if not self.input and isinstance(self.input, list):
            raise APIError(400, "input must not be an empty list", param="input")
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) \
            else self.input  # fmt: skip
        for i, item in enumerate(items):
            if isinstance(item, MessageItem):
                content = _text(item.content, f"input.{i}.content")
                messages.append({"role": item.role, "content": content})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": None})
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                content = _text(item.output, f"input.{i}.output")
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": content})  # fmt: skip
        return messages

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat's ``response_format``: a ``json_schema`` format holds
        its ``name``, ``schema`` and ``strict`` itself, chat's one level down."""
        fmt = (self.text and self.text.format) or None
        if fmt is None or fmt.get("type") != "json_schema":
            return fmt
        inner = {key: value for key, value in fmt.items() if key != "type"}
        return {"type": "json_schema", "json_schema": inner}

    def chat_request(self) -> ChatCompletionRequest:
        """This request as the chat completion it is answered by.

        Raises:
            APIError: 400 for a conversation the chat shape cannot hold.
        """
        fields: dict[str, Any] = dict(
            model=self.model,
            messages=self.messages(),
            stream=self.stream,
            temperature=self.temperature,
            top_p=self.top_p,
            max_completion_tokens=self.max_output_tokens,
            tools=[tool.as_chat() for tool in self.tools] if self.tools else None,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            user=self.user,
            reasoning_effort=self.reasoning.effort if self.reasoning else None,
            response_format=self.response_format(),
        )
        try:
            return ChatCompletionRequest(**fields)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"input: as chat messages, {where}: {first['msg']}",
                           param="input") from None  # fmt: skip


# -- responses ------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] | None = None


class ResponsesUsage(BaseModel):
    """Token counts; the prefix cache's hits are not reported per request (0)."""

    input_tokens: int
    input_tokens_details: dict[str, int] = {"cached_tokens": 0, "cache_write_tokens": 0}
    output_tokens: int
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}
    total_tokens: int


class ResponseObject(BaseModel):
    """OpenAI's ``response`` object (``output_text`` is the SDK's property, not a field)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    model: str
    instructions: str | None
    output: list[OutputMessage | FunctionCallOut]
    parallel_tool_calls: bool
    tool_choice: Any
    tools: list[dict[str, Any]]
    temperature: float
    top_p: float
    max_output_tokens: int | None
    metadata: dict[str, str]
    text: dict[str, Any] = {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    reasoning: dict[str, Any] | None
    user: str | None
    previous_response_id: None = None
    background: bool = False
    store: bool = False  # whatever the request said: nothing is kept
    usage: ResponsesUsage | None = None


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _call_item(call: ParsedCall, status: str = "completed", arguments: str | None = None
               ) -> FunctionCallOut:  # fmt: skip
    """A call's output item; its id follows the call's (``call_X`` -> ``fc_X``)."""
    return FunctionCallOut(
        id="fc_" + call.id.removeprefix("call_"),
        call_id=call.id,
        name=call.name,
        arguments=call.arguments if arguments is None else arguments,
        status=status,  # type: ignore[arg-type]
    )


def _status(finish_reason: str | None) -> tuple[str, IncompleteDetails | None]:
    """A response's status for its choice's finish reason: ``length`` is OpenAI's
    ``max_output_tokens``; an abort (the server ended it) is incomplete, for no reason
    OpenAI names."""
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "abort":
        return "incomplete", IncompleteDetails()
    return "completed", None


class ResponseBuilder:
    """The ``response`` objects of one request: in progress, and whole from its choice's
    text and calls (the same for a streamed and a whole answer)."""

    def __init__(self, rid: str, request: ResponsesRequest) -> None:
        self.rid, self.request = rid, request
        self.created_at = now_s()
        self.message_id = _new_message_id()

    def output(self, text: str, calls: list[ParsedCall], status: str) -> list[Any]:
        """The output items: the message (unless the model only called tools), then
        the calls. With calls, the text's trailing whitespace is dropped."""
        items: list[Any] = []
        if calls:
            text = text.rstrip()
        if text or not calls:
            content = [OutputText(text=text)]
            items.append(OutputMessage(id=self.message_id, status=status, content=content))  # type: ignore[arg-type]
        return items + [_call_item(call) for call in calls]

    def response(self, piece: Piece | None = None, text: str = "",
                 calls: list[ParsedCall] | None = None) -> ResponseObject:  # fmt: skip
        """In progress without ``piece``; else finished by its reason, with ``text``
        and ``calls`` as output and its counts as usage."""
        request = self.request
        status, details, output, usage = "in_progress", None, [], None
        if piece is not None:
            status, details = _status(piece.finish_reason)
            output = self.output(text, calls or [], "completed" if status == "completed"
                                 else "incomplete")  # fmt: skip
            usage = ResponsesUsage(
                input_tokens=piece.num_prompt_tokens,
                output_tokens=piece.num_output_tokens,
                total_tokens=piece.num_prompt_tokens + piece.num_output_tokens,
            )
        return ResponseObject(
            id=self.rid,
            created_at=self.created_at,
            status=status,  # type: ignore[arg-type]
            incomplete_details=details,
            model=request.model,
            instructions=request.instructions,
            output=output,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            tool_choice=request.tool_choice or "auto",
            tools=[tool.model_dump() for tool in request.tools or ()],
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {},
            reasoning=request.reasoning.model_dump() if request.reasoning else None,
            user=request.user,
            text={"format": (request.text and request.text.format) or {"type": "text"}},
            usage=usage,
        )

    def whole(self, piece: Piece) -> ResponseObject:
        """The response of a collected choice (`avmp.serve.responses.collect`)."""
        return self.response(piece, piece.text, piece.tool_calls or [])


class _Events:
    """The typed events of one streamed response, numbered as they are written."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self.numbers = itertools.count()
        # where the message's one text part is
        self.where = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}

    def event(self, kind: str, **fields: Any) -> str:
        data: dict[str, Any] = {"type": kind, "sequence_number": next(self.numbers)}
        for key, value in fields.items():
            data[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return sse_event(data, kind)

    def error(self, error: APIError) -> str:
        return self.event("error", code=error.code or error.kind, message=error.message,
                          param=error.param)  # fmt: skip

    def open_message(self) -> list[str]:
        item = OutputMessage(id=self.builder.message_id, status="in_progress", content=[])
        return [
            self.event("response.output_item.added", output_index=0, item=item),
            self.event("response.content_part.added", part=OutputText(text=""), **self.where),
        ]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", delta=text, logprobs=[], **self.where)

    def finish(self, final: ResponseObject) -> list[str]:
        """The done events of every output item (the calls opened and given whole),
        then the final response."""
        out = []
        for index, item in enumerate(final.output):
            if isinstance(item, OutputMessage):
                part = item.content[0]
                out += [
                    self.event("response.output_text.done", text=part.text, logprobs=[],
                               **self.where),
                    self.event("response.content_part.done", part=part, **self.where),
                ]  # fmt: skip
            else:
                where = {"item_id": item.id, "output_index": index}
                added = item.model_copy(update={"status": "in_progress", "arguments": ""})
                out += [
                    self.event("response.output_item.added", output_index=index, item=added),
                    self.event("response.function_call_arguments.delta", delta=item.arguments,
                               **where),
                    self.event("response.function_call_arguments.done", name=item.name,
                               arguments=item.arguments, **where),
                ]  # fmt: skip
            out.append(self.event("response.output_item.done", output_index=index, item=item))
        kind = "response.completed" if final.status == "completed" else "response.incomplete"
        return out + [self.event(kind, response=final)]


async def sse_responses(
    builder: ResponseBuilder, pieces: AsyncIterator[Piece | Exception]
) -> AsyncIterator[str]:
    """The events of a streamed response (``event: <type>`` and ``data: <json>``; no
    ``[DONE]``, as OpenAI ends these streams). The message item opens at the first text
    that is not whitespace; whitespace at the text's end is held back until more text
    comes, and dropped if the reply ends with calls, so the deltas add up to the
    message of the final response (`ResponseBuilder.output`)."""
    events = _Events(builder)
    yield events.event("response.created", response=builder.response())
    yield events.event("response.in_progress", response=builder.response())
    opened, written, held = False, "", ""
    calls: list[ParsedCall] = []
    last: Piece | None = None
    async for piece in until_error(pieces, events.error):
        if isinstance(piece, str):  # an error event, the stream's last
            yield piece
            return
        last, held = piece, held + piece.text
        calls += piece.tool_calls or []
        if not opened and held.strip():
            opened = True
            for text in events.open_message():
                yield text
        delta = held.rstrip()
        if opened and delta:
            held, written = held[len(delta) :], written + delta
            yield events.delta(delta)
    if last is None:
        raise RuntimeError("a response's choice ended without a piece")
    if not calls:  # the held whitespace is the message's end; an empty reply has one too
        if not opened:
            opened = True
            for text in events.open_message():
                yield text
        if held:
            written += held
            yield events.delta(held)
    for text in events.finish(builder.response(last, written, calls)):
        yield text
