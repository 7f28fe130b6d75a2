"""The OpenAI request and response bodies that `avmp serve` speaks, as pydantic models.

Requests reject fields OpenAI does not define (``extra="forbid"``: a misspelt
``max_token`` is a 400, not a silently ignored limit). Fields OpenAI defines that the
engine cannot honour are accepted at their neutral value and refused otherwise, naming
the field (`unsupported_fields`); metadata (``user``, ``metadata``, ``store``,
``prompt_cache_key``, ``safety_identifier``) is accepted and has no effect. vLLM's
extensions are accepted on the same terms: honoured are ``top_k``, ``min_p``,
``stop_token_ids``, ``ignore_eos``, ``repetition_penalty``, ``min_tokens`` (no
end-of-sequence, stop id or stop string before that many tokens; load generators such as
genai-perf send it with ``ignore_eos``), ``skip_special_tokens``,
``spaces_between_special_tokens``, ``include_stop_str_in_output``,
``truncate_prompt_tokens``, ``request_id``, ``bad_words`` of one token, ``prompt_logprobs``
(per prompt token its log-probability, rank and the top k there: `avmp.serve.echo`), and
the chat template's fields (``chat_template_kwargs``, ``add_generation_prompt``,
``continue_final_message``, ``add_special_tokens``, ``documents``), and structured
outputs (``response_format``, ``structured_outputs``, ``guided_*``: read by
`avmp.serve.structured`). Chat's deprecated
``functions`` and ``function_call`` are read as ``tools`` and ``tool_choice`` and
answered in their own shape (``message.function_call``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from avmp.engine.sampling import MAX_LOGPROBS

# OpenAI's documented default for /v1/completions when max_tokens is not given
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 64  # choices per request at most (each is an engine request)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # fields OpenAI's schema lets be null, which means their default (vLLM reads them so)
    null_is_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls_as_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.null_is_default:
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.null_is_default}


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks: not needed here
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class _Sampling(_Request):
    """The fields both endpoints share."""

    null_is_default: ClassVar[frozenset[str]] = frozenset({"n", "stream"})
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
    # vLLM's extensions
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    request_id: str | None = Field(None, min_length=1)
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    priority: int = 0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # structured outputs (`avmp.serve.structured`): OpenAI's, vLLM's and vLLM's older
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt is text, token ids, or a list of either
    (a batch: one choice per prompt and per ``n``)."""

    null_is_default: ClassVar[frozenset[str]] = frozenset({"n", "stream", "echo"})
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


TEXT_PARTS = ("text", "refusal")  # content part types whose text a template renders


class ContentPart(BaseModel):
    """One part of a message's content: ``text``, or an assistant's ``refusal``. Parts of
    the other types OpenAI defines (``image_url``, ``input_audio``, ``file``) are read far
    enough to name them in the 400 that refuses them (`ChatMessage.non_text_part`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_parts_are_exact(self) -> ContentPart:
        if self.type in TEXT_PARTS:
            if getattr(self, self.type) is None:
                raise ValueError(f"a {self.type!r} content part needs its {self.type!r} field")
            if self.model_extra:
                raise ValueError(f"unknown field {next(iter(self.model_extra))!r} in a "
                                 f"{self.type!r} content part")  # fmt: skip
        return self

    def rendered(self) -> str:
        return (self.text if self.type == "text" else self.refusal) or ""


class FunctionCall(_Request):
    """A call the assistant made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # left in by clients that rebuild a call from stream deltas


class ChatMessage(_Request):
    """A message as OpenAI clients send them, agents' tool turns included: an assistant
    message with ``tool_calls`` (its content may be null), a ``tool`` message answering
    one by ``tool_call_id``, and the deprecated ``function`` role and ``function_call``
    (read as a tool answer and a tool call)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    reasoning_content: str | None = None  # vLLM's: a reasoning model's thinking, sent back
    annotations: list[dict[str, Any]] | None = None  # OpenAI's URL citations: no effect

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.rendered() for part in self.content)

    def non_text_part(self) -> str | None:
        """The type of the first content part that is not text, or None."""
        parts = self.content if isinstance(self.content, list) else []
        return next((part.type for part in parts if part.type not in TEXT_PARTS), None)

    def rendered(self, index: int) -> dict[str, Any]:
        """This message as a chat template reads it (``index``: its place, which names a
        deprecated ``function_call``'s id): OpenAI's ``developer`` role as ``system`` and
        ``function`` as ``tool``, tool calls with their arguments parsed into objects
        (most templates write them with ``tojson``, as vLLM passes them), absent fields
        left out."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text()}
        calls = list(self.tool_calls or ())
        if self.function_call is not None:
            calls.append(ToolCall(id=f"call_{index}", function=self.function_call))
        if calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": _arguments(call.function.arguments)
                }}
                for call in calls
            ]  # fmt: skip
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


def _arguments(text: str) -> Any:
    """A call's arguments as an object when they are a JSON object, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    """A tool the model may call: a function, described for the chat template."""

    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # OpenAI's deprecated forms of tools and tool_choice (`uses_functions`)
    functions: list[FunctionDefinition] | None = Field(None, min_length=1)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    # vLLM's chat-template extensions
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _functions_as_tools(self) -> ChatCompletionRequest:
        """``functions`` and ``function_call`` as the ``tools`` and ``tool_choice`` they
        were replaced by (a named function as a named tool choice)."""
        if self.functions is not None:
            if self.tools is not None:
                raise ValueError("give tools or the deprecated functions, not both")
            self.tools = [Tool(type="function", function=f) for f in self.functions]
        if self.function_call is not None:
            if self.tool_choice is not None:
                raise ValueError("give tool_choice or the deprecated function_call, not both")
            call = self.function_call
            self.tool_choice = call if isinstance(call, str) else {"type": "function",
                                                                   "function": call}  # fmt: skip
        return self

    @property
    def uses_functions(self) -> bool:
        """Whether the request speaks the deprecated functions API, and so is answered in
        it: one call at most, as ``message.function_call``, reason ``function_call``."""
        return self.functions is not None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template reads them (OpenAI's shape), or None."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def reads_tool_calls(self) -> bool:
        """Whether the reply is read for tool calls: tools given and not ``tool_choice``
        ``none`` (``required`` and a named function force a call: `forced_tools`)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_kwargs(self) -> dict[str, Any]:
        """The variables the chat template gets besides the messages, tools and
        documents: ``chat_template_kwargs`` (Qwen's ``enable_thinking``) and
        ``reasoning_effort`` (as vLLM passes it; templates ignore variables they do not
        use).

        Raises:
            ValueError: a kwarg that would override what the server renders.
        """
        kwargs = dict(self.chat_template_kwargs or {})
        taken = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if taken:
            raise ValueError(f"chat_template_kwargs must not set {', '.join(taken)}")
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        return kwargs


# what apply_chat_template takes itself, or the request's own fields set
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
     "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
     "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"}
)  # fmt: skip


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

    Neutral values pass (``best_of`` equal to ``n``, vLLM's ``priority`` 0,
    ``use_beam_search`` false, ``length_penalty`` 1, ``modalities`` ``["text"]``,
    ``verbosity`` ``medium``), since clients send them by default. ``prediction`` passes
    whatever it holds: a predicted output only speeds decoding up, it never changes it.
    """
    checks: list[tuple[str, bool]] = [
        ("priority", request.priority != 0),  # the scheduler serves first come first
        ("use_beam_search", request.use_beam_search),
        ("length_penalty", request.length_penalty != 1.0),  # beam search's alone
        # a mask of all the other tokens per step: the logit-bias path is per token
        ("allowed_token_ids", request.allowed_token_ids is not None),
    ]
    if isinstance(request, CompletionRequest):
        checks += [
            ("best_of", request.best_of not in (None, request.n)),
            ("suffix", bool(request.suffix)),
        ]
    elif isinstance(request, ChatCompletionRequest):
        checks += [
            ("modalities", request.modalities not in (None, ["text"])),
            ("verbosity", request.verbosity not in (None, "medium")),
            ("audio", request.audio is not None),
            ("web_search_options", request.web_search_options is not None),
        ]
    return next((name for name, bad in checks if bad), None)


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a ``prompt`` (special tokens added unless
    ``add_special_tokens`` is false), or chat ``messages`` rendered as
    ``/v1/chat/completions`` renders them (with its template fields; special tokens not
    added again unless asked)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages (one of them)")
        return self

    def chat_request(self, model: str) -> ChatCompletionRequest:
        """The chat completion whose prompt these messages are."""
        return ChatCompletionRequest.model_validate(
            {
                "model": model,
                "messages": self.messages or [],
                "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "add_special_tokens": bool(self.add_special_tokens),
                "chat_template_kwargs": self.chat_template_kwargs,
                "tools": self.tools,
            }
        )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None  # None: no limit set and no engine to ask
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


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


class ToolCallOut(BaseModel):
    """A call the model made, as a response gives it (`avmp.serve.tools`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCallOut):
    """A call in a streamed chunk, whole: ``index`` counts the choice's calls."""

    index: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCall | None = None  # the deprecated functions API's one call


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
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCall | None = None


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
    """OpenAI's model object, with vLLM's additions that clients read to size their
    requests: ``root`` (the served model) and ``max_model_len`` (prompt + output tokens one
    request may hold: ``--max-model-len``, or what the memory holds)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "avmp"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


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


def new_id(prefix: str, request_id: str | None = None) -> str:
    """A response id as OpenAI shapes them (``cmpl-...``, ``chatcmpl-...``): after the
    prefix the client's ``request_id`` where it gave one (as vLLM), else a random one."""
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())
