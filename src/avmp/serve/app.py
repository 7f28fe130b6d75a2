"""The OpenAI-compatible HTTP API over a running `EngineLoop` (FastAPI).

Each choice of a request (each prompt of a batch, times ``n``) is one engine request,
streamed through `EngineLoop.generate`; its token ids become text incrementally and stop
strings cut it (`avmp.serve.text`). A streamed response starts once every choice has its
first update, so that an error the engine raises at once (a prompt too large, a full
queue) still gets its own HTTP status rather than an error in the middle of a stream.

A client that goes away aborts its requests: a streamed response's task is cancelled by
Starlette, which closes the engine generator; a non-streamed one watches the connection
for ``http.disconnect`` while it waits (as vLLM's ``with_cancellation`` does).

Finish reasons are OpenAI's ``stop`` and ``length``, plus vLLM's ``abort`` for a request
the server ended itself (a shutdown past its grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from avmp.engine.loop import EngineClosed, EngineDead, QueueFull
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from avmp.engine.engine import RequestOptions, RequestTooLarge
from avmp.serve.chat import ChatEncoder
from avmp.serve.metrics import ServerMetrics
from avmp.serve.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now_s,
    unsupported_fields,
)
from avmp.serve.text import IncrementalDetokenizer, StopStrings

SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ServeConfig:
    """How the API behaves, besides the engine it serves.

    Attributes:
        model_name: the name clients give as ``model`` (and ``/v1/models`` lists).
        api_key: when set, every ``/v1`` call needs ``Authorization: Bearer <key>``.
        default_max_tokens: a chat request's limit when it gives none (OpenAI's is the
            context's room; completions keep OpenAI's 16).
        shutdown_timeout_s: how long a shutdown waits for the engine to stop.
    """

    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not math.isfinite(self.shutdown_timeout_s) or self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown timeout must be >= 0 s, got {self.shutdown_timeout_s}")


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        error = ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Piece:
    """What one choice produced since its last piece."""

    index: int
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _Timing:
    """One choice's clock, for the latency histograms."""

    arrival_s: float
    last_token_s: float | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)


def create_app(
    loop: Any,
    tokenizer: Any,
    config: ServeConfig,
    chat: ChatEncoder | None = None,
) -> FastAPI:
    """The FastAPI app serving ``loop`` (an `avmp.engine.loop.EngineLoop`, not started:
    the app's lifespan starts it and shuts it down).

    Raises:
        ValueError: no tokenizer (the API speaks text).
    """
    if tokenizer is None:
        raise ValueError(
            "avmp serve needs a tokenizer: give a checkpoint with tokenizer files, or a "
            "zoo name with --random-weights"
        )
    server = _Server(loop, tokenizer, config, chat)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:  # uvicorn's grace period is over: abort what is left, free the memory
            await asyncio.to_thread(
                loop.shutdown, abort_running=True, timeout_s=config.shutdown_timeout_s
            )

    app = FastAPI(title="avmp", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app, server.metrics)
    app.post("/v1/completions", response_model=None)(server.completions)
    app.post("/v1/chat/completions", response_model=None)(server.chat_completions)
    app.get("/v1/models")(server.models)
    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def answer(error: APIError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def api_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, APIError)
        return answer(error)

    async def invalid(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return answer(_validation_error(error))

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return answer(APIError(error.status_code, str(error.detail), kind))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _validation_error(error: RequestValidationError) -> APIError:
    """The first thing wrong with a request body, as one 400 naming the field."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's failed branch shows as a type name in the path (prompt.list[int].0)
    param = ".".join(p for p in loc if not p.startswith(("list[", "str", "int"))) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", param=param)
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)


def _engine_error(error: Exception) -> APIError:
    """An error the engine loop raised for a request, as its HTTP answer."""
    if isinstance(error, RequestTooLarge):
        return APIError(400, str(error), param="prompt", code="context_length_exceeded")
    if isinstance(error, EngineClosed):
        return APIError(503, f"the server is shutting down: {error}", "server_error")
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after_s))
        return APIError(
            429,
            f"too many requests waiting: {error}",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(error, EngineDead):
        return APIError(503, f"the engine stopped: {error}", "server_error")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    raise error


class _Rejected(ValueError):
    """The scheduler could never fit a request (finish reason ``rejected``)."""


class _Server:
    """The endpoints, over one engine loop."""

    def __init__(self, loop: Any, tokenizer: Any, config: ServeConfig, chat: Any) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.config = config
        self.chat = chat
        self.metrics = ServerMetrics(loop.snapshot)
        self.created = now_s()

    # -- endpoints ------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body, request)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        return await self._respond(body, request, prompts, max_tokens, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(body, request)
        if self.chat is None:
            raise APIError(
                400,
                "this model's tokenizer has no chat template: use /v1/completions with a prompt",
                param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = self.chat.encode(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens or self.config.default_max_tokens
        return await self._respond(body, request, [prompt], limit, chat=True)

    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.config.model_name, created=self.created)])

    async def health(self) -> Response:
        snap = self.loop.snapshot()
        if snap.healthy:
            return Response(status_code=200)
        return JSONResponse({"status": "unhealthy", "error": snap.error}, status_code=503)

    async def prometheus(self) -> Response:
        data = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    # -- checks ---------------------------------------------------------------------

    def _check(self, body: Any, request: Request) -> None:
        self._authorize(request)
        if body.model != self.config.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server "
                f"serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        name = unsupported_fields(body)
        if name is not None:
            raise APIError(400, f"{name} is not supported by avmp serve", param=name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "a missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    def _options(self, body: Any, max_tokens: int, choice: int) -> RequestOptions:
        """The engine options of one choice: choice j of ``n`` gets ``seed + j``."""
        try:
            return RequestOptions(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(0, body.top_k or 0),
                seed=None if body.seed is None else body.seed + choice,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
            )
        except ValueError as error:
            raise APIError(400, str(error)) from None

    # -- generation -----------------------------------------------------------------

    async def _respond(
        self,
        body: Any,
        request: Request,
        prompts: list[Any],
        max_tokens: int,
        chat: bool,
    ) -> Response:
        arrival_s = time.perf_counter()
        streams = [
            self._choice(
                i * body.n + j,
                prompt,
                self._options(body, max_tokens, j),
                body.stop_strings(),
                arrival_s,
            )
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]
        if body.stream:
            firsts = await self._first_pieces(streams)
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _sse_chat if chat else _sse_completions
            sse = events(body.model, _merge(firsts, streams), include_usage)
            return StreamingResponse(sse, media_type="text/event-stream")
        pieces = await _unless_disconnected(request, self._collect_all(streams))
        if pieces is None:
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(
            (_chat_response if chat else _completion_response)(body.model, pieces).model_dump()
        )

    async def _choice(
        self,
        index: int,
        prompt: Any,
        options: RequestOptions,
        stops: list[str],
        arrival_s: float,
    ) -> AsyncIterator[Piece]:
        """One engine request as pieces of text; the last has a finish reason. Leaving
        early (a stop string, a closed stream) closes the engine's generator, which
        aborts the request."""
        text = IncrementalDetokenizer(self.tokenizer)
        cut = StopStrings(stops)
        timing = _Timing(arrival_s)
        async with aclosing(self.loop.generate(prompt, options)) as updates:
            async for update in updates:
                self._observe_tokens(timing, len(update.new_token_ids))
                new = text.add(update.new_token_ids) + (text.flush() if update.finished else "")
                piece = cut.add(new)
                reason = "stop" if piece.stopped else update.finish_reason
                if reason == "rejected":
                    raise _Rejected(update.error or "the request can never fit in memory")
                done = piece.stopped or update.finished
                tail = cut.finish() if done and not piece.stopped else ""
                yield Piece(
                    index,
                    piece.text + tail,
                    reason if done else None,
                    update.num_prompt_tokens,
                    update.num_output_tokens,
                )
                if done:
                    self._observe_end(timing, str(reason))
                    return
        raise RuntimeError("the engine ended a request without finishing it")

    def _observe_tokens(self, timing: _Timing, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.perf_counter()
        if timing.last_token_s is None:
            self.metrics.ttft_s.observe(now - timing.arrival_s)
        else:
            self.metrics.inter_token_s.observe((now - timing.last_token_s) / num_tokens)
        timing.last_token_s = now

    def _observe_end(self, timing: _Timing, reason: str) -> None:
        self.metrics.e2e_s.observe(time.perf_counter() - timing.arrival_s)
        self.metrics.finished.labels(reason).inc()

    async def _first_pieces(self, streams: list[AsyncIterator[Piece]]) -> list[Piece]:
        """Every choice's first piece, or (closing all of them) the first error as its
        HTTP answer."""
        results = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return [r for r in results if isinstance(r, Piece)]
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        if not isinstance(failed[0], Exception):
            raise failed[0]
        raise _engine_error(failed[0])

    async def _collect_all(self, streams: list[AsyncIterator[Piece]]) -> list[Piece]:
        """Each choice's whole text, in one piece per choice."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_collect(s)) for s in streams]
        except BaseExceptionGroup as errors:
            first = errors.exceptions[0]
            raise _engine_error(first) if isinstance(first, Exception) else first from None
        return [task.result() for task in tasks]


async def _collect(stream: AsyncIterator[Piece]) -> Piece:
    parts: list[str] = []
    async with aclosing(stream) as pieces:  # type: ignore[type-var]
        async for piece in pieces:
            parts.append(piece.text)
            last = piece
    return Piece(
        last.index,
        "".join(parts),
        last.finish_reason,
        last.num_prompt_tokens,
        last.num_output_tokens,
    )


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
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


async def _merge(
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
    prompts = {p.index: p.num_prompt_tokens for p in pieces}
    prompt_tokens = sum(prompts.values())
    completion = sum(p.num_output_tokens for p in pieces)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def _completion_response(model: str, pieces: list[Piece]) -> CompletionResponse:
    return CompletionResponse(
        id=new_id("cmpl"),
        created=now_s(),
        model=model,
        choices=[
            CompletionChoice(index=p.index, text=p.text, finish_reason=p.finish_reason)
            for p in pieces
        ],
        usage=_usage(pieces),
    )


def _chat_response(model: str, pieces: list[Piece]) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=now_s(),
        model=model,
        choices=[
            ChatChoice(
                index=p.index,
                message=ChatResponseMessage(content=p.text),
                finish_reason=p.finish_reason,
            )
            for p in pieces
        ],
        usage=_usage(pieces),
    )


def _sse(data: Any) -> str:
    """One server-sent event as OpenAI writes them: ``data: <json>`` and a blank line."""
    return f"data: {data.model_dump_json()}\n\n"


class _StreamUsage:
    """The last counts seen per choice, for the final usage chunk."""

    def __init__(self) -> None:
        self.last: dict[int, Piece] = {}

    def add(self, piece: Piece) -> None:
        self.last[piece.index] = piece

    def usage(self) -> Usage:
        return _usage(list(self.last.values()))


async def _sse_completions(
    model: str, pieces: AsyncIterator[Piece | Exception], include_usage: bool
) -> AsyncIterator[str]:
    rid, created, counts = new_id("cmpl"), now_s(), _StreamUsage()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(
            CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    async for piece in _until_error(pieces):
        if isinstance(piece, str):
            yield piece
            continue
        counts.add(piece)
        if piece.text or piece.finish_reason:
            yield chunk(
                [
                    CompletionChoice(
                        index=piece.index, text=piece.text, finish_reason=piece.finish_reason
                    )
                ]
            )
    if include_usage:
        yield chunk([], counts.usage())
    yield SSE_DONE


async def _sse_chat(
    model: str, pieces: AsyncIterator[Piece | Exception], include_usage: bool
) -> AsyncIterator[str]:
    rid, created, counts = new_id("chatcmpl"), now_s(), _StreamUsage()
    started: set[int] = set()

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    async for piece in _until_error(pieces):
        if isinstance(piece, str):
            yield piece
            continue
        counts.add(piece)
        if piece.index not in started:  # OpenAI opens each choice with the role
            started.add(piece.index)
            delta = ChatDelta(role="assistant", content="")
            yield chunk([ChatChunkChoice(index=piece.index, delta=delta)])
        if piece.text or piece.finish_reason:
            delta = ChatDelta(content=piece.text or None)
            yield chunk(
                [ChatChunkChoice(index=piece.index, delta=delta, finish_reason=piece.finish_reason)]
            )
    if include_usage:
        yield chunk([], counts.usage())
    yield SSE_DONE


async def _until_error(
    pieces: AsyncIterator[Piece | Exception],
) -> AsyncIterator[Piece | str]:
    """The pieces; an error stops the stream with one error event (its headers are
    sent already, so the status cannot say it), as vLLM streams errors."""
    async with aclosing(pieces) as items:  # type: ignore[type-var]
        async for item in items:
            if isinstance(item, Exception):
                try:
                    error = _engine_error(item)
                except Exception:
                    error = APIError(500, f"internal error: {item}", "server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            yield item
