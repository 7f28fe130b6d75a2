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

Shutting down has two steps: `drain_engine` (on SIGTERM, while uvicorn waits for the
connections: no new requests, those in flight finish within the grace period, the rest
end as ``abort`` so their clients get a complete answer), then the lifespan's end, which
stops the loop if nothing drained it and so frees the memory.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from avmp.engine.engine import RequestOptions, RequestUpdate
from avmp.engine.sampling import TokenLogprobs
from avmp.serve.chat import ChatEncoder, system_prompt_end
from avmp.serve.echo import PromptSide, prompt_side
from avmp.serve.errors import APIError, Rejected, add_error_handlers, engine_error
from avmp.serve.metrics import ServerMetrics
from avmp.serve.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    logit_bias,
    now_s,
    top_logprobs,
    unsupported_fields,
)
from avmp.serve.responses import (
    Piece,
    TokenLogprob,
    chat_response,
    collect,
    completion_response,
    merge,
    sse_chat,
    sse_completions,
    unless_disconnected,
)
from avmp.serve.text import IncrementalDetokenizer, StopStrings


@dataclass(frozen=True)
class ServeConfig:
    """How the API behaves, besides the engine it serves.

    Attributes:
        model_name: the name clients give as ``model`` (and ``/v1/models`` lists).
        api_key: when set, every ``/v1`` call needs ``Authorization: Bearer <key>``.
        default_max_tokens: a chat request's limit when it gives none (OpenAI's is the
            context's room; completions keep OpenAI's 16).
        shutdown_timeout_s: how long requests in flight may take to finish once a
            shutdown begins; then they are aborted.
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
        finally:  # whatever is left is aborted and the memory freed
            await asyncio.to_thread(server.drain_engine, True)

    app = FastAPI(title="avmp", lifespan=lifespan)
    app.state.server = server
    app.state.drain_engine = server.drain_engine
    add_error_handlers(app, server.metrics)
    app.post("/v1/completions", response_model=None)(server.completions)
    app.post("/v1/chat/completions", response_model=None)(server.chat_completions)
    app.get("/v1/models")(server.models)
    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    return app


class _Server:
    """The endpoints, over one engine loop."""

    def __init__(self, loop: Any, tokenizer: Any, config: ServeConfig, chat: Any) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.config = config
        self.chat = chat
        # a chat's system-prompt end is worth two more encodings only to the avmp cache
        engine = getattr(loop, "engine", None)
        self.boundaries = bool(getattr(engine, "uses_prefix_boundaries", False))
        self.metrics = ServerMetrics(loop.snapshot)
        self.created = now_s()
        self._drained = threading.Lock()
        self._is_drained = False

    def drain_engine(self, abort_running: bool) -> None:
        """Stop the engine loop, once: new requests get 503, running ones finish
        (unless ``abort_running``) within the grace period, the rest are aborted, and
        the engine frees its memory. Blocks; safe to call from any thread, again."""
        with self._drained:
            if self._is_drained:
                return
            self._is_drained = True
            dead = not self.loop.snapshot().healthy  # nothing left would ever finish
            timeout_s = self.config.shutdown_timeout_s
            self.loop.shutdown(abort_running=abort_running or dead, timeout_s=timeout_s)

    # -- endpoints ------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body, request)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: true)",
                           param="max_tokens")  # fmt: skip
        return await self._respond(body, request, prompts, max_tokens, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(body, request)
        if self.chat is None:
            raise APIError(
                400,
                "this model's tokenizer has no chat template: use /v1/completions with a prompt",
                param="messages",
            )
        # OpenAI's "developer" role is what the system role was; templates know the latter
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]  # fmt: skip
        try:
            prompt = self.chat.encode(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        boundary = system_prompt_end(self.chat, messages, prompt) if self.boundaries else 0
        limit = body.max_completion_tokens or body.max_tokens or self.config.default_max_tokens
        return await self._respond(body, request, [prompt], limit, chat=True, boundary=boundary)

    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.config.model_name, created=self.created)])

    async def health(self) -> Response:
        snap = self.loop.snapshot()
        if snap.healthy and snap.accepting:
            return Response(status_code=200)
        error = snap.error if not snap.healthy else "shutting down"
        return JSONResponse({"status": "unhealthy", "error": error}, status_code=503)

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
        if body.prompt_logprobs is not None and body.stream:  # as vLLM
            raise APIError(400, "prompt_logprobs are not available with stream=true",
                           param="prompt_logprobs")  # fmt: skip

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

    def _options(self, body: Any, max_tokens: int, choice: int, boundary: int = 0,
                 side: PromptSide | None = None) -> RequestOptions:  # fmt: skip
        """The engine options of one choice: choice j of ``n`` gets ``seed + j``;
        ``boundary``: where a chat's system prompt ends (`system_prompt_end`); ``side``:
        what it shows of its prompt (max_tokens 0: the engine computes one token)."""
        try:
            logprobs = top_logprobs(body)
        except ValueError as error:
            raise APIError(400, str(error), param="top_logprobs") from None
        try:
            bias = logit_bias(body)
        except ValueError as error:
            raise APIError(400, str(error), param="logit_bias") from None
        try:
            return RequestOptions(
                max_tokens=max(max_tokens, 1),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(0, body.top_k or 0),
                min_p=body.min_p or 0.0,
                seed=None if body.seed is None else body.seed + choice,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                min_tokens=body.min_tokens,
                logprobs=logprobs,
                logit_bias=bias,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0,
                prefix_boundary=boundary,
                prompt_logprobs=None if side is None else side.engine_k,
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
        boundary: int = 0,
    ) -> Response:
        arrival_s = time.perf_counter()
        sides = [self._prompt_side(body, prompt, max_tokens) for prompt in prompts]
        streams = [
            self._choice(
                i * body.n + j,
                prompt if side is None else side.token_ids,
                self._options(body, max_tokens, j, boundary, side),
                body.stop_strings(),
                arrival_s,
                side,
                prompt_index=i,
            )
            for i, (prompt, side) in enumerate(zip(prompts, sides, strict=True))
            for j in range(body.n)
        ]
        if body.stream:
            firsts = await self._first_pieces(streams)
            options = body.stream_options
            include_usage = options is not None and options.include_usage
            continuous = options is not None and options.continuous_usage_stats
            events = sse_chat if chat else sse_completions
            sse = events(body.model, merge(firsts, streams), include_usage, continuous)
            return StreamingResponse(sse, media_type="text/event-stream")
        pieces = await unless_disconnected(request, self._collect_all(streams))
        if pieces is None:
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(
            (chat_response if chat else completion_response)(body.model, pieces).model_dump()
        )

    def _prompt_side(self, body: Any, prompt: Any, max_tokens: int) -> PromptSide | None:
        try:
            return prompt_side(body, self.tokenizer, prompt, max_tokens)
        except ValueError as error:  # text the tokenizer cannot encode
            raise APIError(400, str(error), param="prompt") from None

    async def _choice(
        self,
        index: int,
        prompt: Any,
        options: RequestOptions,
        stops: list[str],
        arrival_s: float,
        side: PromptSide | None = None,
        prompt_index: int | None = None,
    ) -> AsyncIterator[Piece]:
        """One engine request as pieces of text; the last has a finish reason. Leaving
        early (a stop string, a closed stream) closes the engine's generator, which
        aborts the request. ``side``: what the first piece shows of the prompt first;
        ``prompt_index``: the request's prompt it answers (usage counts each once)."""
        text = IncrementalDetokenizer(self.tokenizer)
        cut = StopStrings(stops)
        timing = _Timing(arrival_s)
        offset = 0  # where the next token's text starts among this choice's token texts
        async with aclosing(self.loop.generate(prompt, options)) as updates:
            async for update in updates:
                if side is not None and update.finish_reason != "rejected":
                    head = self._prompt_piece(index, side, update, prompt_index)
                    offset = sum(len(e.token) for e in head.logprobs or ())
                    if side.only or update.finish_reason == "abort":
                        self._observe_end(timing, str(head.finish_reason))
                        yield head
                        return
                    side = None  # shown once, before the first output
                else:
                    head = None
                self._observe_tokens(timing, len(update.new_token_ids))
                new = text.add(update.new_token_ids) + (text.flush() if update.finished else "")
                # before min_tokens no stop string ends the request (as vLLM)
                piece = cut.add(new, match=update.num_output_tokens >= options.min_tokens)
                reason = "stop" if piece.stopped else update.finish_reason
                if reason == "rejected":
                    raise Rejected(update.error or "the request can never fit in memory")
                done = piece.stopped or update.finished
                tail = cut.finish() if done and not piece.stopped else ""
                logprobs = None
                if update.new_logprobs is not None:
                    logprobs, offset = self._logprobs(
                        update.new_token_ids, update.new_logprobs, offset
                    )
                out = Piece(
                    index,
                    piece.text + tail,
                    reason if done else None,
                    update.num_prompt_tokens,
                    update.num_output_tokens,
                    logprobs,
                    prompt_index=prompt_index,
                )
                yield out if head is None else _after(head, out)
                if done:
                    self._observe_end(timing, str(reason))
                    return
        raise RuntimeError("the engine ended a request without finishing it")

    def _prompt_piece(
        self, index: int, side: PromptSide, update: RequestUpdate, prompt_index: int | None
    ) -> Piece:
        """What a choice shows of its prompt, as the piece before its first output: the
        echoed text, the prompt's legacy log-probabilities, vLLM's ``prompt_logprobs``;
        finished (reason ``length``, no output) for ``max_tokens: 0`` or an abort."""
        finished = side.only or update.finish_reason == "abort"
        reason = ("length" if update.finish_reason != "abort" else "abort") if finished else None
        return Piece(
            index,
            side.text or "",
            reason,
            update.num_prompt_tokens,
            0,
            side.legacy(self.tokenizer, update.prompt_logprobs),
            side.vllm(self.tokenizer, update.prompt_logprobs),
            prompt_index,
        )

    def _logprobs(
        self, token_ids: list[int], logprobs: list[TokenLogprobs], offset: int
    ) -> tuple[list[TokenLogprob], int]:
        """The tokens' log-probabilities with their texts (each token decoded alone, as
        vLLM shows them) and text offsets from ``offset``; the offset after them."""
        entries = []
        for token, lp in zip(token_ids, logprobs, strict=True):
            text = self.tokenizer.decode([token])
            top = tuple((self.tokenizer.decode([t]), v) for t, v in lp.top)
            entries.append(TokenLogprob(text, lp.logprob, top, offset))
            offset += len(text)
        return entries, offset

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
        raise engine_error(failed[0])

    async def _collect_all(self, streams: list[AsyncIterator[Piece]]) -> list[Piece]:
        """Each choice's whole text, in one piece per choice."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(collect(s)) for s in streams]
        except BaseExceptionGroup as errors:
            first = errors.exceptions[0]
            raise engine_error(first) if isinstance(first, Exception) else first from None
        return [task.result() for task in tasks]


def _after(head: Piece, piece: Piece) -> Piece:
    """``piece`` with ``head`` (a prompt's side) before it."""
    logprobs = piece.logprobs
    if head.logprobs is not None:
        logprobs = head.logprobs + (logprobs or [])
    return Piece(piece.index, head.text + piece.text, piece.finish_reason,
                 piece.num_prompt_tokens, piece.num_output_tokens, logprobs,
                 head.prompt_logprobs, piece.prompt_index)  # fmt: skip
