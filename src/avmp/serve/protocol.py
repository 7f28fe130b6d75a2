"""The OpenAI request and response bodies that `avmp serve` speaks, as pydantic models.

Requests reject fields OpenAI does not define (``extra="forbid"``: a misspelt
``max_token`` is a 400, not a silently ignored limit). Fields OpenAI defines that the
engine cannot honour are accepted at their neutral value and refused otherwise, naming
the field (`unsupported_fields`). vLLM's extensions that the engine does honour are
accepted too: ``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``, ``repetition_penalty``,
``min_tokens`` (no
end-of-sequence, stop id or stop string before that many tokens; load generators such as
genai-perf send it with ``ignore_eos``), ``prompt_logprobs`` (per prompt token its
log-probability, rank and the top k there: `avmp.serve.echo`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from avmp.engine.sampling import MAX_LOGPROBS

# OpenAI's documented default for /v1/completions when max_tokens is not given
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 64  # choices per request at most (each is an engine request)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks: not needed here
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class _Sampling(_Request):
    """The fields both endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 is off
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt is text, token ids, or a list of either
    (a batch: one choice per prompt and per ``n``)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt alone, with echo only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, one per batch entry."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


def logit_bias(request: _Sampling) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token ids written as strings) as (id, amount) pairs.

    Raises:
        ValueError: a key that is not a token id (the amounts are checked by the engine).
    """
    pairs = []
    for key, amount in (request.logit_bias or {}).items():
        if not key.strip().isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        pairs.append((int(key), amount))
    return tuple(pairs)


def top_logprobs(request: _Sampling) -> int | None:
    """How many most likely tokens to report per output token: None for no log-probabilities
    at all, 0 for the sampled token's alone (completions' ``logprobs``; chat's ``logprobs``
    with ``top_logprobs``).

    Raises:
        ValueError: chat's ``top_logprobs`` without ``logprobs: true`` (as OpenAI).
    """
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if isinstance(request, ChatCompletionRequest):
        if not request.logprobs:
            if request.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return request.top_logprobs or 0
    return None


def unsupported_fields(request: _Sampling) -> str | None:
    """The first field set to something the engine cannot do, or None.

    Neutral values pass (``best_of`` equal to ``n``, an empty ``tools``
    list, a ``text`` response format, ``tool_choice`` ``none``), since clients send them
    by default.
    """
    checks: list[tuple[str, bool]] = []
    if isinstance(request, CompletionRequest):
        checks += [
            ("best_of", request.best_of not in (None, request.n)),
            ("suffix", bool(request.suffix)),
        ]
    elif isinstance(request, ChatCompletionRequest):
        checks += [
            ("response_format", (request.response_format or {}).get("type", "text") != "text"),
            ("tools", bool(request.tools)),
            ("tool_choice", request.tool_choice not in (None, "none")),
        ]
    return next((name for name, bad in checks if bad), None)


# -- responses -----------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: per token its text, log-probability, the most
    likely tokens there (text -> log-probability) and where its text starts in the
    choice's text. With ``echo`` the prompt's tokens come first, the first of them with
    None for both (nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """One token's entry in vLLM's ``prompt_logprobs`` (keyed by its id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's ``prompt_logprobs`` of a choice: None for the first prompt token, then per token
# a dict token id (as a string) -> its entry, the prompt token's first, then the top k
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "avmp"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    """A response id as OpenAI shapes them (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())
