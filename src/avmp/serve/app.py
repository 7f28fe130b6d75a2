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
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import avmp
from avmp.engine.engine import RequestOptions, RequestUpdate
from avmp.engine.generation_config import GenerationDefaults
from avmp.engine.grammar import GrammarSpec
from avmp.engine.sampling import TokenLogprobs
from avmp.serve.chat import ChatEncoder, Rendering, system_prompt_end
from avmp.serve.echo import PromptSide, prompt_side
from avmp.serve.errors import APIError, Rejected, add_error_handlers, engine_error
from avmp.serve.metrics import ServerMetrics
from avmp.serve.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    logit_bias,
    new_id,
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
    read_tool_calls,
    sse_chat,
    sse_completions,
    unless_disconnected,
)
from avmp.serve.responses_api import (
    ResponseBuilder,
    ResponsesRequest,
    new_response_id,
    sse_responses,
)
from avmp.serve.structured import forced_tools, requested_grammar, tool_call_spec
from avmp.serve.text import DecodeWith, IncrementalDetokenizer, StopStrings
from avmp.serve.tools import ToolSyntax, tool_syntax


@dataclass(frozen=True)
class ServeConfig:
    """How the API behaves, besides the engine it serves.

    Attributes:
        model_name: the name clients give as ``model`` (and ``/v1/models`` lists).
        api_key: when set, every ``/v1`` call needs ``Authorization: Bearer <key>``.
        default_max_tokens: a chat request's limit when it gives none, at most the room
            its prompt leaves (OpenAI's default is that room; completions keep OpenAI's 16).
        shutdown_timeout_s: how long requests in flight may take to finish once a
            shutdown begins; then they are aborted.
        tool_call_parser: how replies to requests with tools are read for tool calls
            (`avmp.serve.tools.tool_syntax`: ``auto`` guesses from the chat template).
        allowed_origins: the origins a browser may call the API from (CORS; ``*``:
            any); none by default.
        generation: the checkpoint's generation config
            (`avmp.engine.generation_config`): the defaults of the sampling values a
            request leaves out, a cap on every request's output length, and the
            end-of-sequence ids whose text a reply leaves out.
    """

    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256
    shutdown_timeout_s: float = 30.0
    tool_call_parser: str = "auto"
    allowed_origins: tuple[str, ...] = ()
    generation: GenerationDefaults = GenerationDefaults()

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not math.isfinite(self.shutdown_timeout_s) or self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown timeout must be >= 0 s, got {self.shutdown_timeout_s}")
        tool_syntax(self.tool_call_parser, "")  # a known name


BAN = -100.0  # OpenAI's logit bias that bans a token


@dataclass(frozen=True)
class _TextOptions:
    """How a request's tokens become text: its stop strings, and vLLM's
    ``include_stop_str_in_output``, ``skip_special_tokens``,
    ``spaces_between_special_tokens``."""

    stops: tuple[str, ...]
    include_stop: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


@dataclass
class _Timing:
    """One choice's clock, for the latency histograms."""

    arrival_s: float
    last_token_s: float | None = None
    ttft_s: float | None = None
    ended: bool = False  # counted among the finished requests
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
    app.state.abort_engine = server.abort_engine
    add_error_handlers(app, server.metrics)
    if config.allowed_origins:  # browsers' preflight requests are answered before routing
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])  # fmt: skip
    app.post("/v1/completions", response_model=None)(server.completions)
    app.post("/v1/chat/completions", response_model=None)(server.chat_completions)
    app.post("/v1/responses", response_model=None)(server.responses)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model:path}")(server.model)  # served names may hold a slash
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/health")(server.health)
    app.get("/ping")(server.health)  # vLLM's (SageMaker's) name for it
    app.post("/ping")(server.health)
    app.get("/version")(server.version)
    app.get("/metrics")(server.prometheus)
    return app


class _Server:
    """The endpoints, over one engine loop."""

    def __init__(self, loop: Any, tokenizer: Any, config: ServeConfig, chat: Any) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.config = config
        self.chat = chat
        self.tool_syntax = tool_syntax(config.tool_call_parser, chat.template if chat else "")
        # a chat's system-prompt end is worth two more encodings only to the avmp cache
        engine = getattr(loop, "engine", None)
        self.boundaries = bool(getattr(engine, "uses_prefix_boundaries", False))
        self.metrics = ServerMetrics(loop.snapshot)
        # read before the loop's thread starts: /tokenize reports it
        self.max_model_len = engine.max_request_tokens() if engine is not None else None
        # the ids that end a request, whose text a reply leaves out (`_written`)
        eos = {*getattr(engine, "eos_token_ids", ()), tokenizer.eos_token_id}
        self._eos_ids = frozenset(i for i in eos if i is not None)
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

    def abort_engine(self) -> None:
        """Abort every request now (a drain under way ends at once: each client gets
        reason ``abort``); the loop then stops as `drain_engine` stops it. Blocks until
        then; safe beside a drain."""
        self.loop.shutdown(abort_running=True, timeout_s=0.0)

    # -- endpoints ------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body, request)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if body.truncate_prompt_tokens is not None:  # vLLM's: the last k tokens
            k = body.truncate_prompt_tokens
            prompts = [(self.tokenizer.encode(p) if isinstance(p, str) else p)[-k:]
                       for p in prompts]  # fmt: skip
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: true)",
                           param="max_tokens")  # fmt: skip
        grammar = await self._grammar(body)
        return await self._respond(body, request, prompts, max_tokens, chat=False,
                                   grammar=grammar)  # fmt: skip

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(body, request)
        prompt, boundary = self._chat_prompt(body)
        limit = body.max_completion_tokens or body.max_tokens or self._default_limit(prompt)
        syntax = self.tool_syntax if body.reads_tool_calls() else None
        grammar = await self._grammar(body)
        return await self._respond(body, request, [prompt], limit, chat=True, boundary=boundary,
                                   tools=syntax, grammar=grammar)  # fmt: skip

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API, answered as the chat completion it maps onto
        (`avmp.serve.responses_api`)."""
        self._authorize(request)
        self._check_model(body.model)
        unsupported = body.unsupported()
        if unsupported is not None:
            name, why = unsupported
            raise APIError(400, f"{name} is not supported by avmp serve: {why}", param=name)
        chat = body.chat_request()
        self._check(chat, request)
        prompt, boundary = self._chat_prompt(chat)
        limit = chat.max_completion_tokens or self._default_limit(prompt)
        syntax = self.tool_syntax if chat.reads_tool_calls() else None
        builder = ResponseBuilder(new_response_id(), body)
        grammar = await self._grammar(chat)
        arrival_s = time.perf_counter()
        streams = self._choices(chat, [prompt], limit, boundary, syntax, arrival_s, grammar)
        if body.stream:
            firsts = await unless_disconnected(request, self._first_pieces(streams))
            if firsts is None:
                return Response(status_code=499)  # nobody reads it
            events = sse_responses(builder, merge(firsts, streams))
            return StreamingResponse(events, media_type="text/event-stream")
        pieces = await unless_disconnected(request, self._collect_all(streams))
        if pieces is None:
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(builder.whole(pieces[0]).model_dump(mode="json"))

    def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], int]:
        """A chat's prompt token ids and where its system prompt ends in them."""
        if self.chat is None:
            raise APIError(
                400,
                "this model's tokenizer has no chat template: use /v1/completions with a "
                "prompt, or start avmp serve with --chat-template",
                param="messages",
            )
        for i, message in enumerate(body.messages):
            part = message.non_text_part()
            if part is not None:
                why = f"messages[{i}] has a content part of type {part!r}, but this model takes"
                raise APIError(400, why + " text only", param=f"messages.{i}.content")
        messages = [message.rendered(i) for i, message in enumerate(body.messages)]
        rendering = self._rendering(body)
        try:
            prompt = self.chat.encode(messages, rendering)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        boundary = 0
        if self.boundaries:
            boundary = system_prompt_end(self.chat, messages, prompt, rendering)
        if body.truncate_prompt_tokens is not None:  # vLLM's: the last k tokens
            dropped = max(0, len(prompt) - body.truncate_prompt_tokens)
            prompt, boundary = prompt[dropped:], max(0, boundary - dropped)
        return prompt, boundary

    def _default_limit(self, prompt: list[int]) -> int:
        """A chat's output limit when it gives none: ``default_max_tokens``, but no more
        than the room its prompt leaves (OpenAI's default is that room), so that a prompt
        that fits is not refused for a limit the client never set."""
        limit = self.config.default_max_tokens
        if self.max_model_len is None:
            return limit
        return max(1, min(limit, self.max_model_len - len(prompt)))

    @staticmethod
    def _rendering(body: ChatCompletionRequest) -> Rendering:
        """The request's chat-template fields (400 for a contradiction)."""
        try:
            kwargs = body.template_kwargs()
        except ValueError as error:
            raise APIError(400, str(error), param="chat_template_kwargs") from None
        try:
            return Rendering(
                tools=body.template_tools(),
                documents=body.documents,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                add_special_tokens=body.add_special_tokens,
                kwargs=kwargs,
            )
        except ValueError as error:
            raise APIError(400, str(error), param="continue_final_message") from None

    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[self._card()])

    async def model(self, model: str, request: Request) -> ModelCard:
        self._authorize(request)
        self._check_model(model)
        return self._card()

    def _card(self) -> ModelCard:
        return ModelCard(id=self.config.model_name, created=self.created,
                         root=self.config.model_name, max_model_len=self.max_model_len)

    async def tokenize(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        """vLLM's: a prompt's or a chat's token ids, as a request would have them."""
        self._authorize(request)
        if body.model is not None:
            self._check_model(body.model)
        if body.prompt is not None:
            add = body.add_special_tokens is not False
            try:
                tokens = list(self.tokenizer.encode(body.prompt, add_special_tokens=add))
            except ValueError as error:  # text the tokenizer cannot encode
                raise APIError(400, str(error), param="prompt") from None
        else:
            tokens, _ = self._chat_prompt(body.chat_request(self.config.model_name))
        strs = [self.tokenizer.decode([t]) for t in tokens] if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len,
                                tokens=tokens, token_strs=strs)  # fmt: skip

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        """vLLM's: the text of token ids (special tokens skipped)."""
        self._authorize(request)
        if body.model is not None:
            self._check_model(body.model)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in the vocabulary [0, {vocab})",
                           param="tokens")  # fmt: skip
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    async def version(self) -> dict[str, str]:
        return {"version": avmp.__version__}

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
        self._check_model(body.model)
        name = unsupported_fields(body)
        if name is not None:
            raise APIError(400, f"{name} is not supported by avmp serve", param=name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")
        if body.prompt_logprobs is not None and body.stream:  # as vLLM
            raise APIError(400, "prompt_logprobs are not available with stream=true",
                           param="prompt_logprobs")  # fmt: skip

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

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
                 side: PromptSide | None = None,
                 grammar: GrammarSpec | None = None) -> RequestOptions:  # fmt: skip
        """The engine options of one choice: choice j of ``n`` gets ``seed + j``;
        ``boundary``: where a chat's system prompt ends (`system_prompt_end`); ``side``:
        what it shows of its prompt (max_tokens 0: the engine computes one token);
        ``grammar``: what its output must match (each choice gets its own matcher)."""
        try:
            logprobs = top_logprobs(body)
        except ValueError as error:
            raise APIError(400, str(error), param="top_logprobs") from None
        try:
            bias = logit_bias(body)
        except ValueError as error:
            raise APIError(400, str(error), param="logit_bias") from None
        bias += self._bans(body.bad_words or ())
        default = self.config.generation  # what the request leaves out
        try:
            return RequestOptions(
                max_tokens=max(max_tokens, 1),
                temperature=_given(body.temperature, default.temperature, 1.0),
                top_p=_given(body.top_p, default.top_p, 1.0),
                top_k=max(0, int(_given(body.top_k, default.top_k, 0))),
                min_p=_given(body.min_p, default.min_p, 0.0),
                seed=None if body.seed is None else body.seed + choice,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                min_tokens=body.min_tokens,
                logprobs=logprobs,
                logit_bias=bias,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                repetition_penalty=_given(body.repetition_penalty, default.repetition_penalty,
                                          1.0),  # fmt: skip
                prefix_boundary=boundary,
                prompt_logprobs=None if side is None else side.engine_k,
                grammar=grammar,
            )
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def _grammar(self, body: Any) -> GrammarSpec | None:
        """The grammar a request's output must match (`avmp.serve.structured`): its
        structured-output fields, or a call that ``tool_choice`` forces, written in this
        model's tool syntax (one call for a named function or ``parallel_tool_calls``
        false). Compiled here, in a worker thread, into the engine's cache of compiled
        grammars (`Engine.compile_grammar`), so that the engine thread only copies it
        and an error names the field.

        Raises:
            APIError: 400 for two constraints at once, a forced call without tools or
                without a known tool syntax, a malformed field, or a grammar that does
                not compile.
        """
        found = self._requested_grammar(body)
        if found is None:
            return None
        param, spec = found
        compile_grammar = getattr(getattr(self.loop, "engine", None), "compile_grammar", None)
        if compile_grammar is not None:
            try:
                await asyncio.to_thread(compile_grammar, spec)
            except ValueError as error:
                raise APIError(400, str(error), param=param) from None
        return spec

    def _requested_grammar(self, body: Any) -> tuple[str, GrammarSpec] | None:
        """`_grammar`'s spec and the field it came from, not compiled yet."""
        tool_spec = None
        forced = getattr(body, "tool_choice", None) not in (None, "none", "auto")
        if forced and not body.tools:
            raise APIError(400, "tool_choice 'required' or a named function needs tools",
                           param="tool_choice")  # fmt: skip
        if forced:
            functions = forced_tools(body.template_tools(), body.tool_choice)
            if self.tool_syntax is None:
                raise APIError(400, "tool_choice 'required' or a named function needs the "
                               "model's tool-call syntax: start avmp serve with "
                               "--tool-call-parser hermes, nemotron or jamba",
                               param="tool_choice")  # fmt: skip
            single = (body.tool_choice != "required" or body.parallel_tool_calls is False
                      or _uses_functions(body))  # fmt: skip
            tool_spec = tool_call_spec(self.tool_syntax, functions or [], single)
        return requested_grammar(body, tool_spec)

    def _bans(self, words: Any) -> tuple[tuple[int, float], ...]:
        """vLLM's ``bad_words`` as logit biases of -100 (OpenAI's ban): each word as written
        and after a space, as vLLM encodes them. A word of several tokens would need a ban
        that depends on the tokens before it, which the logit-bias path has not: 400."""
        bans = []
        for word in words:
            for spelling in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(spelling, add_special_tokens=False)
                if len(ids) != 1:
                    why = f"bad_words: {spelling!r} is {len(ids)} tokens; only words of one"
                    raise APIError(400, why + " token can be banned", param="bad_words")
                bans.append((ids[0], BAN))
        return tuple(dict.fromkeys(bans))

    # -- generation -----------------------------------------------------------------

    async def _respond(
        self,
        body: Any,
        request: Request,
        prompts: list[Any],
        max_tokens: int,
        chat: bool,
        boundary: int = 0,
        tools: ToolSyntax | None = None,
        grammar: GrammarSpec | None = None,
    ) -> Response:
        """``tools``: the syntax the choices' text is read for tool calls in, if any;
        ``grammar``: what every choice's output must match."""
        arrival_s = time.perf_counter()
        rid = new_id("chatcmpl" if chat else "cmpl", body.request_id)
        streams = self._choices(body, prompts, max_tokens, boundary, tools, arrival_s, grammar)
        if body.stream:
            # a client may leave while its requests wait for their first token (a long
            # queue): the stream has not started, so nothing else would notice
            firsts = await unless_disconnected(request, self._first_pieces(streams))
            if firsts is None:
                return Response(status_code=499)  # nobody reads it
            options = body.stream_options
            include_usage = options is not None and options.include_usage
            continuous = options is not None and options.continuous_usage_stats
            functions = _uses_functions(body)
            sse = merge(firsts, streams)
            if chat:
                events = sse_chat(rid, body.model, sse, include_usage, continuous, functions)
            else:
                events = sse_completions(rid, body.model, sse, include_usage, continuous)
            return StreamingResponse(events, media_type="text/event-stream")
        pieces = await unless_disconnected(request, self._collect_all(streams))
        if pieces is None:
            return Response(status_code=499)  # nobody reads it
        if chat:
            answer: Any = chat_response(rid, body.model, pieces, _uses_functions(body))
        else:
            answer = completion_response(rid, body.model, pieces)
        return JSONResponse(answer.model_dump())

    def _choices(
        self,
        body: Any,
        prompts: list[Any],
        max_tokens: int,
        boundary: int,
        tools: ToolSyntax | None,
        arrival_s: float,
        grammar: GrammarSpec | None = None,
    ) -> list[AsyncIterator[Piece]]:
        """The pieces of each choice: each prompt of ``body`` times its ``n``, read for
        tool calls in ``tools``' syntax where given, held to ``grammar`` if any."""
        text = _TextOptions(
            tuple(body.stop_strings()),
            body.include_stop_str_in_output,
            # a family's tool tags may be special tokens (vLLM's Hermes and Jamba parsers
            # keep them for the same reason)
            body.skip_special_tokens and tools is None,
            body.spaces_between_special_tokens,
        )
        cap = self.config.generation.max_tokens  # max_new_tokens caps all, as in vLLM
        max_tokens = max_tokens if cap is None else min(max_tokens, cap)
        sides = [self._prompt_side(body, prompt, max_tokens) for prompt in prompts]
        streams = [
            self._choice(
                i * body.n + j,
                prompt if side is None else side.token_ids,
                self._options(body, max_tokens, j, boundary, side, grammar),
                text,
                arrival_s,
                side,
                prompt_index=i,
            )
            for i, (prompt, side) in enumerate(zip(prompts, sides, strict=True))
            for j in range(body.n)
        ]
        if tools is not None:
            single = body.parallel_tool_calls is False or _uses_functions(body)
            streams = [read_tool_calls(stream, tools, single) for stream in streams]
        return streams

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
        settings: _TextOptions,
        arrival_s: float,
        side: PromptSide | None = None,
        prompt_index: int | None = None,
    ) -> AsyncIterator[Piece]:
        """One engine request as pieces of text; the last has a finish reason. Leaving
        early (a stop string, a closed stream) closes the engine's generator, which
        aborts the request. ``side``: what the first piece shows of the prompt first;
        ``prompt_index``: the request's prompt it answers (usage counts each once). A
        client that leaves ends it as ``abort`` in the finished-requests counter."""
        timing = _Timing(arrival_s)
        pieces = self._pieces(index, prompt, options, settings, timing, side, prompt_index)
        try:
            async with aclosing(pieces):  # closed at once, aborting the engine's request
                async for piece in pieces:
                    yield piece
        except (GeneratorExit, asyncio.CancelledError):
            if not timing.ended:  # the client left: the engine aborts the request
                self._observe_end(timing, "abort")
            raise

    async def _pieces(
        self,
        index: int,
        prompt: Any,
        options: RequestOptions,
        settings: _TextOptions,
        timing: _Timing,
        side: PromptSide | None,
        prompt_index: int | None,
    ) -> AsyncGenerator[Piece, None]:
        """`_choice`'s pieces, timed on ``timing``."""
        decoder = self.tokenizer
        if not settings.skip_special_tokens or not settings.spaces_between_special_tokens:
            decoder = DecodeWith(decoder, settings.skip_special_tokens,
                                 settings.spaces_between_special_tokens)  # fmt: skip
        text = IncrementalDetokenizer(decoder)
        cut = StopStrings(settings.stops, include=settings.include_stop)
        offset = 0  # where the next token's text starts among this choice's token texts
        async with aclosing(self.loop.generate(prompt, options)) as updates:
            async for update in updates:
                self._observe_tokens(timing, len(update.new_token_ids))
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
                new = text.add(self._written(update, settings))
                new += text.flush() if update.finished else ""
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
                if done:  # counted before it is handed on: a reader may stop at it
                    self._observe_end(timing, str(reason))
                yield out if head is None else _after(head, out)
                if done:
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
            prompt_logprobs=side.vllm(self.tokenizer, update.prompt_logprobs),
            prompt_index=prompt_index,
        )

    def _written(self, update: Any, settings: _TextOptions) -> list[int]:
        """The new tokens whose text is written: an end-of-sequence token that ends the
        request (the tokenizer's or one the generation config names) is not, where
        special tokens are (vLLM leaves it out, as a stop string)."""
        ids = update.new_token_ids
        if (
            not settings.skip_special_tokens
            and not settings.include_stop
            and update.finish_reason == "stop"
            and ids
            and ids[-1] in self._eos_ids
        ):
            return list(ids[:-1])
        return list(ids)

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
        timing.ended = True
        self.metrics.e2e_s.observe(time.perf_counter() - timing.arrival_s)
        self.metrics.finished.labels(reason).inc()

    async def _first_pieces(self, streams: list[AsyncIterator[Piece]]) -> list[Piece]:
        """Every choice's first piece, or (closing all of them) the first error as its
        HTTP answer, at once: a choice refused (a full queue) does not wait for the others'
        first tokens, which could wait in that queue for minutes."""

        async def first(stream: AsyncIterator[Piece]) -> Piece:
            return await anext(stream)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(first(s)) for s in streams]
        except BaseExceptionGroup as errors:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            error = errors.exceptions[0]
            raise engine_error(error) if isinstance(error, Exception) else error from None
        return [task.result() for task in tasks]

    async def _collect_all(self, streams: list[AsyncIterator[Piece]]) -> list[Piece]:
        """Each choice's whole text, in one piece per choice."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(collect(s)) for s in streams]
        except BaseExceptionGroup as errors:
            first = errors.exceptions[0]
            raise engine_error(first) if isinstance(first, Exception) else first from None
        return [task.result() for task in tasks]


def _given(value: float | None, default: float | None, neutral: float) -> float:
    """A request's sampling value, else the generation config's, else the API's own."""
    return value if value is not None else default if default is not None else neutral


def _uses_functions(body: Any) -> bool:
    return isinstance(body, ChatCompletionRequest) and body.uses_functions


def _after(head: Piece, piece: Piece) -> Piece:
    """``piece`` with ``head`` (a prompt's side) before it."""
    logprobs = piece.logprobs
    if head.logprobs is not None:
        logprobs = head.logprobs + (logprobs or [])
    return replace(piece, text=head.text + piece.text, logprobs=logprobs,
                   prompt_logprobs=head.prompt_logprobs)  # fmt: skip
