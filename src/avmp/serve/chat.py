"""Chat messages to prompt token ids: the checkpoint's own chat template, or, for the
demo models that use the Mistral tokenizer bundled in mistral-common, that library's own
instruct encoding (``[INST] ... [/INST]``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from avmp.engine.tokenizer import MISTRAL_TOKENIZER_FILE, TOKENIZER_FILES, MistralTokenizer

# {"role", "content"} and, where given, "name", "tool_calls", "tool_call_id",
# "reasoning_content" (`avmp.serve.protocol.ChatMessage.rendered`)
Message = dict[str, Any]


@dataclass(frozen=True)
class Rendering:
    """How a chat is rendered besides its messages: the request's ``tools`` and vLLM's
    chat-template fields (``documents``, ``add_generation_prompt``,
    ``continue_final_message``, ``add_special_tokens``, and ``kwargs``, the template's
    own variables: ``chat_template_kwargs`` with ``reasoning_effort``)."""

    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "add_generation_prompt and continue_final_message cannot both be true: set "
                "add_generation_prompt false to continue the last message"
            )


class ChatEncoder(Protocol):
    @property
    def template(self) -> str:
        """The chat template's text ("" where there is none), which says how the model
        writes tool calls (`avmp.serve.tools.tool_syntax`)."""
        ...

    def encode(self, messages: list[Message], rendering: Rendering = Rendering()) -> list[int]:
        """The prompt's token ids, ending where the assistant's reply begins (or, with
        ``continue_final_message``, where the last message's text ends).

        Raises:
            ValueError: messages the template cannot render (one line).
        """
        ...


class TemplateChat:
    """A Hugging Face tokenizer's ``chat_template``, rendered with the generation prompt
    and tokenized without adding special tokens again (the template writes them), as
    vLLM does."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def encode(self, messages: list[Message], rendering: Rendering = Rendering()) -> list[int]:
        try:
            text = self._tok.apply_chat_template(
                messages,
                tools=rendering.tools,
                documents=rendering.documents,
                add_generation_prompt=rendering.add_generation_prompt,
                continue_final_message=rendering.continue_final_message,
                tokenize=False,
                **rendering.kwargs,
            )
        except Exception as error:  # jinja2 raises its own errors (raise_exception)
            raise ValueError(f"the chat template cannot render these messages: {error}") from None
        return list(self._tok.encode(text, add_special_tokens=rendering.add_special_tokens))

    @property
    def template(self) -> str:
        """The template's text (several named templates joined)."""
        template = self._tok.chat_template
        return "\n".join(template.values()) if isinstance(template, dict) else str(template)


NO_MISTRAL_TOOLS = (
    "the demo tokenizer's chat encoding (mistral-common's v1 instruct format) has no tools "
    "or tool messages: serve a checkpoint whose chat template renders them"
)


class MistralChat:
    """mistral-common's instruct encoding for its bundled v1 tokenizer."""

    def __init__(self) -> None:
        import mistral_common
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _Mistral

        path = Path(mistral_common.__file__).parent / "data" / MISTRAL_TOKENIZER_FILE
        self._tok: Any = _Mistral.from_file(str(path))
        self.template = ""  # its format is code, and has no tools

    def encode(self, messages: list[Message], rendering: Rendering = Rendering()) -> list[int]:
        """As `ChatEncoder.encode`; the template variables (``rendering.kwargs``) are
        ignored, as a template ignores those it does not use.

        Raises:
            ValueError: as `ChatEncoder.encode`, and tools, documents or a rendering other
                than a generation prompt, which the v1 format does not write.
        """
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        if rendering.tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            raise ValueError(NO_MISTRAL_TOOLS)
        other = [name for name, given in [
            ("documents", bool(rendering.documents)),
            ("continue_final_message", rendering.continue_final_message),
            ("add_generation_prompt", not rendering.add_generation_prompt),
            ("add_special_tokens", rendering.add_special_tokens),
        ] if given]  # fmt: skip
        if other:
            raise ValueError(f"the demo tokenizer's chat encoding (mistral-common's v1 "
                             f"instruct format) cannot take {other[0]}")  # fmt: skip
        # its messages take no names; the v1 format would not write them anyway
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            request = ChatCompletionRequest(messages=plain)  # type: ignore[type-var]
            return list(self._tok.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValueError) as error:
            raise ValueError(f"mistral-common cannot encode these messages: {error}") from None


def system_prompt_end(
    encoder: ChatEncoder,
    messages: list[Message],
    prompt: list[int],
    rendering: Rendering = Rendering(),
) -> int:
    """Prompt tokens that the chat's leading system messages fill, as requests with the
    same system prompt share them (`RequestOptions.prefix_boundary`): where the prompt
    stops agreeing with the encoding of the system messages and a stand-in first message,
    whichever stand-in of two agrees less (the first message's own text could begin with
    one). 0 when the chat starts with no system message, holds nothing else, or the
    template places the system prompt later (some put it in the last user message)."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    if lead == 0 or lead == len(messages):
        return 0
    end = len(prompt)
    # the stand-in chat ends where the first message after the system's does
    rendering = replace(rendering, add_generation_prompt=True, continue_final_message=False)
    for stand_in in ("A", "B"):
        chat = [*messages[:lead], {**messages[lead], "content": stand_in}]
        try:
            other = encoder.encode(chat, rendering)
        except ValueError:
            return 0
        same = 0
        for ours, theirs in zip(prompt, other, strict=False):
            if ours != theirs:
                break
            same += 1
        end = min(end, same)
    return end


def load_chat_encoder(
    model: str | Path | None, tokenizer: Any, chat_template: str | None = None
) -> ChatEncoder | None:
    """The chat encoding for a model: its checkpoint tokenizer's chat template (None when
    it has none), mistral-common's for the bundled demo tokenizer, else None.
    ``chat_template`` (vLLM's ``--chat-template``) replaces the checkpoint's.

    Raises:
        ValueError: a ``chat_template`` without a checkpoint tokenizer to take it, or
            one that cannot render a one-message chat (one line).
    """
    has_files = model is not None and Path(model).is_dir() and any(
        (Path(model) / name).is_file() for name in TOKENIZER_FILES
    )  # fmt: skip
    if chat_template is not None and (isinstance(tokenizer, MistralTokenizer) or not has_files):
        raise ValueError("a chat template needs the checkpoint's own tokenizer files; the "
                         "demo tokenizer has mistral-common's chat encoding")  # fmt: skip
    if isinstance(tokenizer, MistralTokenizer):
        return MistralChat()
    if not has_files:
        return None
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model))
    if chat_template is not None:
        hf.chat_template = chat_template
        check_template(TemplateChat(hf))
    return TemplateChat(hf) if hf.chat_template else None


def check_template(chat: ChatEncoder) -> None:
    """Renders a one-message chat, so that a template that cannot is found at start-up.

    Raises:
        ValueError: the template's error, in one line.
    """
    try:
        chat.encode([{"role": "user", "content": "Hello"}])
    except ValueError as error:
        raise ValueError(" ".join(str(error).split())) from None


def read_chat_template(value: str) -> str:
    """vLLM's ``--chat-template``: a file's text, or the template itself when no file has
    that name and it holds Jinja (``{{`` or ``{%``); its syntax checked.

    Raises:
        ValueError: neither a file nor a template, or a template Jinja cannot parse.
    """
    import jinja2

    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{value}: a directory, not a template file")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            where = f"{error.reason} at byte {error.start}"
            raise ValueError(f"{value}: not UTF-8 text ({where})") from None
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"{value}: no such file, and not a Jinja template either")
    try:  # transformers renders templates with the loop-controls extension
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"line {error.lineno}: {error.message}") from None
    return text
