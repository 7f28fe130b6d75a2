"""The prompt's side of a response: completions' ``echo`` (the prompt's text before the
output's, and with ``logprobs: k`` the prompt's tokens first in the legacy
log-probabilities) and vLLM's ``prompt_logprobs: k`` extension, both read from the
engine's prompt log-probabilities (`RequestOptions.prompt_logprobs`).

As vLLM shapes them: the first prompt token has no log-probability (None in
``token_logprobs``, ``top_logprobs`` and ``prompt_logprobs``); ``max_tokens: 0`` with
``echo`` answers the prompt alone, reason ``length`` (the engine still computes one
token, which is dropped); ``prompt_logprobs`` is refused with ``stream``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avmp.engine.sampling import TokenLogprobs
from avmp.serve.protocol import CompletionRequest, PromptLogprob, PromptLogprobs
from avmp.serve.responses import TokenLogprob, finite


@dataclass(frozen=True)
class PromptSide:
    """What one choice shows of its prompt.

    Attributes:
        token_ids: the prompt's tokens.
        text: the text echoed before the output (the prompt as given, or its token ids
            decoded); None: no echo.
        echo_logprobs: with echo, the top k of the prompt's entries in the legacy
            log-probabilities (None: the request asked for none).
        prompt_logprobs: vLLM's ``prompt_logprobs`` k (None: not asked).
        only: ``max_tokens: 0``: the prompt is the whole answer.
    """

    token_ids: list[int]
    text: str | None
    echo_logprobs: int | None
    prompt_logprobs: int | None
    only: bool = False

    @property
    def engine_k(self) -> int | None:
        """The engine's `RequestOptions.prompt_logprobs`: enough for both shapes."""
        ks = [k for k in (self.echo_logprobs, self.prompt_logprobs) if k is not None]
        return max(ks) if ks else None

    def legacy(
        self, tokenizer: Any, logprobs: list[TokenLogprobs | None] | None
    ) -> list[TokenLogprob] | None:
        """The prompt's entries of the legacy log-probabilities, offsets from 0 (each
        token decoded alone, as output tokens are); None unless echoed with logprobs."""
        if self.echo_logprobs is None or self.text is None or logprobs is None:
            return None
        k, entries, offset = self.echo_logprobs, [], 0
        for token, lp in zip(self.token_ids, logprobs, strict=False):
            text = tokenizer.decode([token])
            if lp is None:
                entries.append(TokenLogprob(text, None, None, offset))
            else:
                top = tuple((tokenizer.decode([t]), v) for t, v in lp.top[:k])
                entries.append(TokenLogprob(text, lp.logprob, top, offset))
            offset += len(text)
        return entries

    def vllm(
        self, tokenizer: Any, logprobs: list[TokenLogprobs | None] | None
    ) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs``: per position the prompt token's entry (its rank
        counted over the vocabulary), then the top k's (ranks 1..k)."""
        if self.prompt_logprobs is None or logprobs is None:
            return None
        out: PromptLogprobs = []
        for token, lp in zip(self.token_ids, logprobs, strict=False):
            if lp is None:
                out.append(None)
                continue
            entries = {str(token): _entry(tokenizer, token, lp.logprob, lp.rank)}
            for rank, (top, value) in enumerate(lp.top[: self.prompt_logprobs], 1):
                entries.setdefault(str(top), _entry(tokenizer, top, value, rank))
            out.append(entries)
        return out


def _entry(tokenizer: Any, token: int, logprob: float, rank: int | None) -> PromptLogprob:
    return PromptLogprob(
        logprob=finite(logprob), rank=rank, decoded_token=tokenizer.decode([token])
    )


def prompt_side(
    body: Any, tokenizer: Any, prompt: str | list[int], max_tokens: int
) -> PromptSide | None:
    """What a choice of ``body`` shows of ``prompt`` (None: nothing: no echo, no
    ``prompt_logprobs``)."""
    echo = isinstance(body, CompletionRequest) and body.echo
    if not echo and body.prompt_logprobs is None:
        return None
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = None
    if echo:
        text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    echo_logprobs = body.logprobs if echo else None
    return PromptSide(ids, text, echo_logprobs, body.prompt_logprobs, only=max_tokens == 0)
