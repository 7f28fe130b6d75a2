"""Pieces of generated text into OpenAI responses: whole bodies, or server-sent events
(``data: <json>`` per chunk, then ``data: [DONE]``) with one chunk per new piece of each
choice, the choices of a request interleaved as they come."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from avmp.serve.errors import APIError, engine_error
from avmp.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCall,
    PromptLogprobs,
    ToolCallDelta,
    ToolCallOut,
    Usage,
    now_s,
)
from avmp.serve.tools import ParsedCall, ToolCallReader, ToolSyntax

SSE_DONE = "data: [DONE]\n\n"


# a log-probability JSON can carry: vLLM writes -9999.0 for -inf too
LOWEST_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability as a response shows it: the token's text, where that
    text starts in the choice's token texts (``offset``), and the most likely tokens
    there (text, log-probability). An echoed prompt's first token has None for both."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None
    offset: int


@dataclass
class Piece:
    """What one choice produced since its last piece; ``logprobs``: one per token of the
    piece when the request asked for them (an echoed prompt's first); ``tool_calls``: the
    calls read from the text (`read_tool_calls`; the text is then what lies outside them),
    None where the request is not read for calls; ``prompt_logprobs``: vLLM's, in the
    choice's first piece when asked for (`avmp.serve.echo`); ``prompt_index``: which
    prompt of the request the choice answers (None: its own)."""

    index: int
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ParsedCall] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_index: int | None = None


async def collect(stream: AsyncIterator[Piece]) -> Piece:
    parts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    calls: list[ParsedCall] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    async with aclosing(stream) as pieces:  # type: ignore[type-var]
        async for piece in pieces:
            parts.append(piece.text)
            if piece.logprobs is not None:
                logprobs = (logprobs or []) + piece.logprobs
            if piece.tool_calls is not None:
                calls = (calls or []) + piece.tool_calls
            prompt_logprobs = piece.prompt_logprobs or prompt_logprobs
            last = piece
    return Piece(
        last.index,
        "".join(parts),
        last.finish_reason,
        last.num_prompt_tokens,
        last.num_output_tokens,
        logprobs,
        calls,
        prompt_logprobs,
        last.prompt_index,
    )


async def read_tool_calls(
    stream: AsyncIterator[Piece], syntax: ToolSyntax, single: bool = False
) -> AsyncIterator[Piece]:
    """A choice's pieces with the tool calls in its text read out (`ToolCallReader`): each
    piece's text is the content that can be given out by then, its ``tool_calls`` the
    calls completed; a choice that called a tool and stopped finishes with
    ``tool_calls``. ``single`` (``parallel_tool_calls: false``): calls after the first
    are dropped."""
    reader = ToolCallReader(syntax)
    async with aclosing(stream) as pieces:  # type: ignore[type-var]
        async for piece in pieces:
            out = reader.add(piece.text)
            if piece.finish_reason is not None:
                out += reader.finish()
            reason = piece.finish_reason
            if reason == "stop" and reader.num_calls:
                reason = "tool_calls"
            calls = [x for x in out if isinstance(x, ParsedCall)]
            if single:
                calls = calls[: max(0, 1 - (reader.num_calls - len(calls)))]
            text = "".join(x for x in out if isinstance(x, str))
            yield replace(piece, text=text, finish_reason=reason, tool_calls=calls)


def finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
    if entries is None:
        return None
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[None if e.logprob is None else finite(e.logprob) for e in entries],
        top_logprobs=[
            None if e.top is None else {text: finite(v) for text, v in e.top} for e in entries
        ],
        text_offset=[e.offset for e in entries],
    )


def chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None

    def one(text: str, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **one(e.token, e.logprob or 0.0).model_dump(),  # chat echoes no prompt
                top_logprobs=[one(text, v) for text, v in e.top or ()],
            )
            for e in entries
        ]
    )


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or None (with ``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left, or this handler itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def _disconnect(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read already,
    so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(
    firsts: list[Piece], streams: list[AsyncIterator[Piece]]
) -> AsyncIterator[Piece | Exception]:
    """The first pieces, then every choice's later pieces as they come (each choice
    pumped by its own task); an error of one choice comes through as a value. Closing
    this generator cancels the pumps, which closes the choices (aborting them)."""
    yield_queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(stream) as pieces:  # type: ignore[type-var]
                async for piece in pieces:
                    await yield_queue.put(piece)
        except Exception as error:
            await yield_queue.put(error)
        finally:
            yield_queue.put_nowait(None)

    for piece in firsts:
        yield piece
    live = [s for s, first in zip(streams, firsts, strict=True) if first.finish_reason is None]
    for s, first in zip(streams, firsts, strict=True):
        if first.finish_reason is not None:
            await s.aclose()  # type: ignore[attr-defined]
    tasks = [asyncio.create_task(pump(s)) for s in live]
    try:
        remaining = len(tasks)
        while remaining:
            item = await yield_queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(pieces: list[Piece]) -> Usage:
    """Prompt tokens counted once per prompt (the ``n`` choices of one prompt share
    it, as OpenAI counts), completion tokens of every choice."""
    prompts = {p.index if p.prompt_index is None else p.prompt_index: p.num_prompt_tokens
               for p in pieces}  # fmt: skip
    prompt_tokens = sum(prompts.values())
    completion = sum(p.num_output_tokens for p in pieces)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def completion_response(rid: str, model: str, pieces: list[Piece]) -> CompletionResponse:
    return CompletionResponse(
        id=rid,
        created=now_s(),
        model=model,
        choices=[
            CompletionChoice(
                index=p.index,
                text=p.text,
                logprobs=completion_logprobs(p.logprobs),
                finish_reason=p.finish_reason,
                prompt_logprobs=p.prompt_logprobs,
            )
            for p in pieces
        ],
        usage=_usage(pieces),
    )


def _message(piece: Piece, functions: bool) -> ChatResponseMessage:
    """A choice's message: its text, or, where it called tools, the calls and the text
    around them (stripped; null if nothing is left); with ``functions`` (the deprecated
    API) its one call as ``function_call``."""
    if not piece.tool_calls:
        return ChatResponseMessage(content=piece.text)
    content = piece.text.strip() or None
    if functions:
        (call,) = piece.tool_calls  # read with one call at most
        function = FunctionCall(name=call.name, arguments=call.arguments)
        return ChatResponseMessage(content=content, function_call=function)
    calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
             for c in piece.tool_calls]  # fmt: skip
    return ChatResponseMessage(content=content, tool_calls=calls)


def _chat_reason(reason: str | None, functions: bool) -> str | None:
    """The deprecated functions API's finish reason for a call is ``function_call``."""
    return "function_call" if functions and reason == "tool_calls" else reason


def chat_response(
    rid: str, model: str, pieces: list[Piece], functions: bool = False
) -> ChatCompletionResponse:
    """``functions``: answer in the deprecated functions API's shape (`_message`)."""
    return ChatCompletionResponse(
        id=rid,
        created=now_s(),
        model=model,
        choices=[
            ChatChoice(
                index=p.index,
                message=_message(p, functions),
                logprobs=chat_logprobs(p.logprobs),
                finish_reason=_chat_reason(p.finish_reason, functions),
                prompt_logprobs=p.prompt_logprobs,
            )
            for p in pieces
        ],
        usage=_usage(pieces),
    )


def _sse(data: Any) -> str:
    return sse_event(data.model_dump(mode="json"))


def sse_event(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event as OpenAI writes them: ``data: <json>`` (after ``event:
    <name>`` where given, as the Responses API's) and a blank line.

    The JSON is ASCII (non-ASCII text as ``\\u2028``-style escapes): a client that splits the
    stream with ``str.splitlines`` (httpx's ``aiter_lines`` does) also breaks lines at
    U+2028, U+2029 and U+0085, which generated text may hold, and would read half an
    event."""
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n"


class _StreamUsage:
    """The last counts seen per choice, for the final usage chunk."""

    def __init__(self) -> None:
        self.last: dict[int, Piece] = {}

    def add(self, piece: Piece) -> None:
        self.last[piece.index] = piece

    def usage(self) -> Usage:
        return _usage(list(self.last.values()))


async def sse_completions(
    rid: str,
    model: str,
    pieces: AsyncIterator[Piece | Exception],
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """Completion chunks of the response ``rid``; ``include_usage``: a last chunk with the
    usage and no choices; ``continuous_usage`` (vLLM's ``continuous_usage_stats``): the
    usage so far in every chunk too."""
    created, counts = now_s(), _StreamUsage()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        if continuous_usage and usage is None:
            usage = counts.usage()
        return _sse(
            CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    async for piece in until_error(pieces):
        if isinstance(piece, str):
            yield piece
            continue
        counts.add(piece)
        if piece.text or piece.finish_reason or piece.logprobs:
            yield chunk(
                [
                    CompletionChoice(
                        index=piece.index,
                        text=piece.text,
                        logprobs=completion_logprobs(piece.logprobs),
                        finish_reason=piece.finish_reason,
                    )
                ]
            )
    if include_usage:
        yield chunk([], counts.usage())
    yield SSE_DONE


async def sse_chat(
    rid: str,
    model: str,
    pieces: AsyncIterator[Piece | Exception],
    include_usage: bool,
    continuous_usage: bool = False,
    functions: bool = False,
) -> AsyncIterator[str]:
    """Chat chunks, the usage as `sse_completions` gives it; ``functions``: a call as the
    deprecated functions API's ``function_call`` delta (`chat_response`)."""
    created, counts = now_s(), _StreamUsage()
    started: set[int] = set()
    num_calls: dict[int, int] = {}  # per choice: the index its next tool call gets

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        if continuous_usage and usage is None:
            usage = counts.usage()
        return _sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    async for piece in until_error(pieces):
        if isinstance(piece, str):
            yield piece
            continue
        counts.add(piece)
        if piece.index not in started:  # OpenAI opens each choice with the role
            started.add(piece.index)
            delta = ChatDelta(role="assistant", content="")
            yield chunk([ChatChunkChoice(index=piece.index, delta=delta)])
        if piece.text or piece.finish_reason or piece.logprobs or piece.tool_calls:
            delta = ChatDelta(content=piece.text or None)
            if functions and piece.tool_calls:
                call = piece.tool_calls[0]  # read with one call at most
                delta.function_call = FunctionCall(name=call.name, arguments=call.arguments)
            else:
                delta.tool_calls = _deltas(piece, num_calls)
            logprobs = chat_logprobs(piece.logprobs)
            yield chunk(
                [
                    ChatChunkChoice(
                        index=piece.index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=_chat_reason(piece.finish_reason, functions),
                    )
                ]
            )
    if include_usage:
        yield chunk([], counts.usage())
    yield SSE_DONE


def _deltas(piece: Piece, num_calls: dict[int, int]) -> list[ToolCallDelta] | None:
    """A piece's tool calls as stream deltas, each whole (id, name and arguments at once),
    indexed from the choice's calls so far."""
    if not piece.tool_calls:
        return None
    first = num_calls.get(piece.index, 0)
    num_calls[piece.index] = first + len(piece.tool_calls)
    return [
        ToolCallDelta(index=first + k, id=c.id,
                      function=FunctionCall(name=c.name, arguments=c.arguments))
        for k, c in enumerate(piece.tool_calls)
    ]  # fmt: skip


def _error_event(error: APIError) -> str:
    return sse_event(error.body())


async def until_error(
    pieces: AsyncIterator[Piece | Exception],
    error_event: Callable[[APIError], str] = _error_event,
) -> AsyncIterator[Piece | str]:
    """The pieces; an error stops the stream with one error event (its headers are
    sent already, so the status cannot say it), as vLLM streams errors: by default
    ``data: {"error": {...}}``, else what ``error_event`` writes."""
    async with aclosing(pieces) as items:  # type: ignore[type-var]
        async for item in items:
            if isinstance(item, Exception):
                try:
                    error = engine_error(item)
                except Exception:
                    error = APIError(500, f"internal error: {item}", "server_error")
                yield error_event(error)
                return
            yield item
