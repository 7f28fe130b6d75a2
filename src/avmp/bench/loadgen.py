"""A load generator for any OpenAI-compatible server (``avmp bench serve``).

It speaks only the HTTP API (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, streamed as server-sent events), so the same run measures
avmp, vLLM or SGLang. Conventions follow vLLM's ``bench serve``, which users compare
against: requests leave on a Poisson or gamma schedule (``burstiness`` k is the gamma
shape, k = 1 is Poisson) or all at once, or, from a trace file, each at its trace arrival
times a time scale (`LoadConfig.time_scale`: SGLang's bench_serving replays Mooncake
traces so, under ``--mooncake-slowdown-factor``), optionally under a concurrency cap; TTFT is
the time to the first streamed chunk that carries text, ITL every later gap between
such chunks, TPOT ``(e2e - ttft) / (output tokens - 1)``, and goodput the requests per
second that meet every latency objective.

Token counts come from the server's own ``usage`` (``stream_options.include_usage``);
a server that sends none is counted one token per text chunk and the record says so.

Prompts: ShareGPT conversations as text (turn 0; ``max_tokens`` = the tokens of turn 1
under vLLM's rules, `avmp.bench.sharegpt`), or prompt/output lengths from a trace file
or a workload preset, sent as token-id lists of exactly that length (ids drawn with the
seed from ``PROMPT_TOKEN_IDS``, a range every real vocabulary has and that skips the
low ids where tokenizers keep their special tokens), or, given the server's tokenizer,
as text of that many tokens under it (`text_prompt`). Where a trace names what its
prompts are made of (`avmp.sched.request.RequestSpec.segments`), the token-id prompts
share what it shares (`content_prompts`); text prompts do not, as decoding and encoding
again can shift tokens across a segment's edge. vLLM's ``random`` dataset
(`RandomLengths`) is sent the same way. ``ignore_eos`` (a vLLM and SGLang extension) is
sent by default so that every output is as long as the trace says.

Conversations (`run_conversations`): closed-loop, each turn sent over the chat endpoint
with the whole history, the server's own earlier answers included, once the previous
answer has ended; the summary splits TTFT by turn, where a prefix cache shows.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from avmp.bench.files import write_atomic

if TYPE_CHECKING:
    from avmp.sched.request import RequestSpec

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
PROMPT_TOKEN_IDS = (100, 1000)
"""Token ids of synthetic prompts: uniform on [100, 1000)."""
DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
GOODPUT_METRICS = ("ttft", "tpot", "e2e")
MAX_ERRORS_KEPT = 5
RESULT_SCHEMA = "avmp-bench-serve/1"
METRICS = ("ttft", "tpot", "itl", "e2e")
"""The latency distributions summarised and drawn, in milliseconds."""


class BenchError(ValueError):
    """The benchmark cannot measure this server (e.g. every warm-up request failed);
    the message says what the server answered."""


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a text or token-id prompt and how many tokens to ask for.

    ``prompt_tokens`` is the prompt's length as built (exact for token ids, counted with
    the dataset's tokenizer for text); the server's own count replaces it when reported.
    ``arrival_s``: when a trace says the request arrives, in seconds from its first
    (None: the request comes from no trace). ``history``: the (role, content) chat
    messages sent before ``prompt``, a conversation's earlier turns (chat only).
    """

    prompt: str | list[int]
    prompt_tokens: int
    max_tokens: int
    arrival_s: float | None = None
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoadConfig:
    """How one run loads the server.

    Attributes:
        base_url: ``http(s)://host[:port]`` (a trailing ``/v1`` is dropped).
        model: the model name sent in every request.
        endpoint: ``completions`` or ``chat``.
        request_rate: requests/s of the arrival schedule; ``inf`` sends all at once.
            Not read under ``time_scale``.
        time_scale: None, or send each request at its trace arrival (`BenchRequest.
            arrival_s`) times this (0.5: twice as fast), the first at once: the trace's
            own timing instead of a rate.
        burstiness: gamma shape k of the gaps (1: Poisson; < 1 burstier).
        max_concurrency: requests in flight at most (None: no cap).
        ignore_eos: send ``ignore_eos: true`` so outputs run to ``max_tokens``.
        request_timeout_s: one request's bound, from sending to its last byte.
        max_duration_s: the whole run's bound (None: none); what is unfinished then
            is cancelled and counted failed.
        seed: seeds the arrival schedule.
        api_key: sent as ``Authorization: Bearer``.
        think_time_s: in a conversation (`run_conversations`), the wait between an
            answer's end and the next turn.
    """

    base_url: str
    model: str
    endpoint: str = "completions"
    request_rate: float = math.inf
    time_scale: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    max_duration_s: float | None = None
    seed: int = 0
    api_key: str | None = None
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_url(self.base_url))
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; known: {', '.join(ENDPOINTS)}")
        if not self.request_rate > 0:
            raise ValueError(
                f"request rate must be > 0 requests/s (or inf), got {self.request_rate}"
            )
        if self.time_scale is not None and not 0 < self.time_scale < math.inf:
            raise ValueError(f"time scale must be a positive number, got {self.time_scale}")
        if not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if not 0 < self.request_timeout_s < math.inf:
            raise ValueError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.max_duration_s is not None and not 0 < self.max_duration_s < math.inf:
            raise ValueError(f"max duration must be positive, got {self.max_duration_s}")
        if not 0 <= self.think_time_s < math.inf:
            raise ValueError(f"think time must be >= 0 seconds, got {self.think_time_s}")


def normalize_url(url: str) -> str:
    """The server's base URL without a trailing ``/`` or ``/v1``.

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad server URL {url!r}: expected http://HOST[:PORT]")
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ValueError(f"bad server URL {url!r}: the port is not a number in 0-65535") from None
    base = url.strip().rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


# -- requests -----------------------------------------------------------------------


def token_prompt(
    num_tokens: int, rng: np.random.Generator, vocab_size: int | None = None
) -> list[int]:
    """A prompt of exactly ``num_tokens`` token ids drawn from `PROMPT_TOKEN_IDS` (within
    the first ``vocab_size`` ids when a smaller vocabulary is known)."""
    low, high = PROMPT_TOKEN_IDS
    if vocab_size is not None and vocab_size < high:
        low, high = min(low, vocab_size // 2), vocab_size
    return [int(t) for t in rng.integers(low, high, size=num_tokens)]


def text_prompt(num_tokens: int, rng: np.random.Generator, tokenizer: Any) -> tuple[str, int]:
    """A text prompt of about ``num_tokens`` tokens under ``tokenizer`` (a transformers
    tokenizer), and its exact length: random ids decoded, re-encoded, cut to
    ``num_tokens`` and decoded again (as vLLM's random dataset does), since decoding
    and encoding again need not give the same ids back."""
    return text_of_ids(token_prompt(num_tokens, rng, len(tokenizer)), tokenizer)


def text_of_ids(ids: list[int], tokenizer: Any) -> tuple[str, int]:
    """``ids`` as text under ``tokenizer`` and its exact length: decoded, re-encoded, cut
    to ``len(ids)`` and decoded again (`text_prompt`)."""
    text = tokenizer.decode(ids)
    cut = tokenizer.encode(text, add_special_tokens=False)[: len(ids)]
    text = tokenizer.decode(cut)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


# One of these is in every directory transformers reads a tokenizer from
# (save_pretrained writes tokenizer_config.json; older repositories have a vocabulary).
TOKENIZER_DIRECTORY_FILES = (
    "tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
)  # fmt: skip


def load_tokenizer(name: str) -> Any:
    """A transformers tokenizer from a local directory or a Hugging Face model id.

    Raises:
        OSError: transformers cannot find or read it, or the directory holds no tokenizer
            files (transformers' own message then blames a missing sentencepiece).
    """
    from transformers import AutoTokenizer

    path = Path(name)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_DIRECTORY_FILES):
        raise OSError(
            f"{name}: no tokenizer files in this directory (none of "
            f"{', '.join(TOKENIZER_DIRECTORY_FILES)})"
        )
    return AutoTokenizer.from_pretrained(name)


def length_requests(
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    seed: int,
    tokenizer: Any | None = None,
) -> list[BenchRequest]:
    """Requests of the given prompt and output lengths (a trace, a preset): token-id
    prompts of exactly that length, or text through ``tokenizer`` (`text_prompt`)."""
    rng = np.random.default_rng(seed)
    built = []
    for p, o in zip(prompt_tokens, output_tokens, strict=True):
        if tokenizer is None:
            built.append(BenchRequest(token_prompt(int(p), rng), int(p), int(o)))
        else:
            text, length = text_prompt(int(p), rng, tokenizer)
            built.append(BenchRequest(text, length, int(o)))
    return built


def content_prompts(specs: Sequence[RequestSpec], seed: int) -> list[list[int]]:
    """Token-id prompts of the requests' lengths in which the same content id is the same
    ids, so that a server's prefix cache sees what the trace shares.

    Ids come from one generator seeded with ``seed``, drawn as `token_prompt` draws them:
    a content id's ids when a segment first needs them (a later, longer segment of the
    same id draws the rest; a shorter one takes their start), a prompt without segments
    its own ids, so a trace that names no content gets `length_requests`' prompts. An
    ``output_segment`` a later prompt names is drawn like any content: the server's real
    answer to the earlier request is other tokens, so its cache can hold the earlier
    prompt but not the answer as the later prompt sends it.
    """
    rng = np.random.default_rng(seed)
    ids_of: dict[Hashable, list[int]] = {}
    prompts = []
    for spec in specs:
        if not spec.segments:
            prompts.append(token_prompt(spec.prompt_tokens, rng))
            continue
        prompt: list[int] = []
        for content_id, num_tokens in spec.segments:
            ids = ids_of.setdefault(content_id, [])
            if len(ids) < num_tokens:
                ids.extend(token_prompt(num_tokens - len(ids), rng))
            prompt.extend(ids[:num_tokens])
        prompts.append(prompt)
    return prompts


def trace_requests(
    path: str | Path,
    num_prompts: int | None,
    seed: int,
    fmt: str | None = None,
    tokenizer: Any | None = None,
    time_unit: str | None = None,
) -> list[BenchRequest]:
    """The first ``num_prompts`` requests of a trace file (all by default), as
    `spec_requests` builds them (``time_unit``: of its numeric times, `read_trace`)."""
    from avmp.bench.traces import read_trace

    return spec_requests(read_trace(path, fmt, time_unit)[:num_prompts], seed, tokenizer)


def spec_requests(
    specs: list[RequestSpec], seed: int, tokenizer: Any | None = None
) -> list[BenchRequest]:
    """A trace's requests, each with its arrival time (sent at it under
    `LoadConfig.time_scale`, else the rate decides): token-id prompts that share what the
    trace says they share (`content_prompts`), or text of each length under ``tokenizer``
    (`length_requests`; sharing nothing)."""
    outputs = [s.output_tokens for s in specs]
    if tokenizer is None:
        prompts = content_prompts(specs, seed)
        built = [BenchRequest(p, len(p), o) for p, o in zip(prompts, outputs, strict=True)]
    else:
        built = length_requests([s.prompt_tokens for s in specs], outputs, seed, tokenizer)
    return [replace(b, arrival_s=s.arrival_s) for b, s in zip(built, specs, strict=True)]


def preset_requests(
    name: str, num_prompts: int | None, seed: int, tokenizer: Any | None = None
) -> list[BenchRequest]:
    """A workload preset's lengths (`avmp.bench.workloads.PRESETS`) as requests."""
    from avmp.bench.workloads import make_workload

    specs = make_workload(name, seed, num_requests=num_prompts)
    prompts, outputs = [s.prompt_tokens for s in specs], [s.output_tokens for s in specs]
    return length_requests(prompts, outputs, seed, tokenizer)


DEFAULT_RANDOM_INPUT_LEN = 1024  # vLLM's --random-input-len
DEFAULT_RANDOM_OUTPUT_LEN = 128  # vLLM's --random-output-len


@dataclass(frozen=True)
class RandomLengths:
    """The lengths of vLLM's ``random`` dataset, as its ``RandomDataset`` draws them
    (``get_sampling_params`` in vllm/benchmarks/datasets.py): each prompt a prefix of
    ``prefix_len`` tokens that every prompt shares, then a length uniform on the integers
    of [floor(input_len * (1 - r)), ceil(input_len * (1 + r))]; each output uniform on
    the same range around ``output_len``, at least 1 (r = ``range_ratio``).

    vLLM counts ``input_len`` less the special tokens its tokenizer adds; we do not, as
    token-id prompts get none (text under a tokenizer is as `text_prompt` makes it).
    """

    input_len: int = DEFAULT_RANDOM_INPUT_LEN
    output_len: int = DEFAULT_RANDOM_OUTPUT_LEN
    range_ratio: float = 0.0
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"the range ratio must be in [0, 1), got {self.range_ratio}")
        if self.input_len < 0 or self.prefix_len < 0:
            raise ValueError("input and prefix lengths must be >= 0 tokens")
        if self.output_len < 1:
            raise ValueError(f"the output length must be >= 1 token, got {self.output_len}")
        if self.prefix_len + self.input_bounds()[0] < 1:
            raise ValueError(
                "the shortest prompt would have no token: the prefix length plus "
                "floor(input length x (1 - range ratio)) must be >= 1"
            )

    def input_bounds(self) -> tuple[int, int]:
        """The least and most tokens after the prefix, both included."""
        low = math.floor(self.input_len * (1 - self.range_ratio))
        return low, math.ceil(self.input_len * (1 + self.range_ratio))

    def output_bounds(self) -> tuple[int, int]:
        low = max(1, math.floor(self.output_len * (1 - self.range_ratio)))
        return low, max(1, math.ceil(self.output_len * (1 + self.range_ratio)))

    def sample(self, num: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """``num`` lengths after the prefix, and ``num`` output lengths."""
        (in_low, in_high), (out_low, out_high) = self.input_bounds(), self.output_bounds()
        inputs = rng.integers(in_low, in_high + 1, size=num)
        outputs = rng.integers(out_low, out_high + 1, size=num)
        return [int(n) for n in inputs], [int(n) for n in outputs]

    def describe(self) -> str:
        """``input 128 +-50%, output 64 +-50%, prefix 16`` (what a result names)."""
        spread = f" +-{self.range_ratio:.0%}" if self.range_ratio else ""
        prefix = f", prefix {self.prefix_len}" if self.prefix_len else ""
        return f"input {self.input_len}{spread}, output {self.output_len}{spread}{prefix}"


def random_requests(
    lengths: RandomLengths, num_prompts: int, seed: int, tokenizer: Any | None = None
) -> list[BenchRequest]:
    """vLLM's ``random`` dataset (`RandomLengths`): token-id prompts of exactly the drawn
    length (the shared prefix, then ids drawn as `token_prompt` draws them), or, under
    ``tokenizer``, the same ids as text (`text_of_ids`: the prefix's text is shared as far
    as decoding and encoding again leave it)."""
    rng = np.random.default_rng(seed)
    vocab_size = len(tokenizer) if tokenizer is not None else None
    prefix = token_prompt(lengths.prefix_len, rng, vocab_size)
    inputs, outputs = lengths.sample(num_prompts, rng)
    built = []
    for num_tokens, max_tokens in zip(inputs, outputs, strict=True):
        ids = prefix + token_prompt(num_tokens, rng, vocab_size)
        if tokenizer is None:
            built.append(BenchRequest(ids, len(ids), max_tokens))
        else:
            text, length = text_of_ids(ids, tokenizer)
            built.append(BenchRequest(text, length, max_tokens))
    return built


def sharegpt_requests(
    num_prompts: int, seed: int, limit: int | None = None, output_len: int | None = None
) -> list[BenchRequest]:
    """ShareGPT under vLLM's rules: prompt = turn 0 as text, ``max_tokens`` = the tokens
    of turn 1 (or ``output_len``), the same conversations `sharegpt.sample_lengths` picks
    for this seed. vLLM's ``--sharegpt-output-len`` also filters by the length it asks
    for; ``output_len`` changes what is asked, not which conversations are sent.

    Args:
        limit: read only the first ``limit`` conversations of the dataset (tests).
    """
    from avmp.bench import sharegpt

    prompts, outputs = sharegpt.sample_lengths(num_prompts, seed, rules="vllm", limit=limit)
    cache = sharegpt.load_length_cache(limit)
    turns = sharegpt.read_conversations(limit).turns
    order = np.random.default_rng(seed).permutation(len(cache.words))
    wanted = list(zip(prompts.tolist(), outputs.tolist(), strict=True))
    chosen: list[BenchRequest] = []
    # sample_lengths keeps, in this order, every conversation whose lengths pass its
    # filters, and the filters read only the lengths: so the k-th conversation in order
    # with the k-th pair's lengths is the k-th one it kept.
    for index in order:
        i = int(index)
        if len(chosen) == len(wanted):
            break
        if cache.num_turns[i] >= 2 and tuple(cache.tokens.get(i, ())) == wanted[len(chosen)]:
            prompt_len, answer_len = wanted[len(chosen)]
            chosen.append(BenchRequest(turns[i][0][1], prompt_len, output_len or answer_len))
    return chosen


@dataclass(frozen=True)
class Conversation:
    """One conversation to send turn by turn (`run_conversations`): its user messages in
    order, each message's tokens as built (counted with the dataset's tokenizer), and the
    tokens asked for each answer. The answers it is sent with are the server's own."""

    messages: tuple[str, ...]
    message_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("a conversation needs at least one message")
        if not len(self.messages) == len(self.message_tokens) == len(self.max_tokens):
            raise ValueError("a conversation needs a token count and a max_tokens per message")

    @property
    def num_turns(self) -> int:
        return len(self.messages)

    def first_turn(self) -> BenchRequest:
        """The first message alone, as a single-turn request (warm-up)."""
        return BenchRequest(self.messages[0], self.message_tokens[0], self.max_tokens[0])


SHAREGPT_MAX_CONTEXT_TOKENS = 2048
"""The most tokens of a replayed ShareGPT conversation: vLLM's bound on one request's
prompt + output, applied to each turn's whole context (messages and answers)."""


def sharegpt_conversations(
    num_conversations: int,
    seed: int,
    max_turns: int | None = None,
    output_len: int | None = None,
    limit: int | None = None,
) -> list[Conversation]:
    """ShareGPT conversations shuffled with the seed, each its leading (human, gpt) pairs
    (`avmp.bench.sharegpt.pick_conversations`): the human turns as text, ``max_tokens``
    the tokens of the dataset's answer (or ``output_len``), cut after ``max_turns`` turns
    and before the first turn whose context passes `SHAREGPT_MAX_CONTEXT_TOKENS`; a
    conversation whose first turn passes it is skipped.

    Raises:
        ValueError: fewer than ``num_conversations`` conversations qualify.
    """
    from avmp.bench import sharegpt

    def turns_kept(pairs: list[tuple[int, int]]) -> int:
        context, kept = 0, 0
        for message, answer in pairs[:max_turns]:
            context += message + (output_len or answer)
            if context > SHAREGPT_MAX_CONTEXT_TOKENS:
                break
            kept += 1
        return kept

    rng = np.random.default_rng(seed)
    cache = sharegpt.load_length_cache(limit)
    chosen = sharegpt.pick_conversations(
        cache, num_conversations, rng, limit, accept=lambda pairs: turns_kept(pairs) > 0
    )
    texts = sharegpt.read_conversations(limit).turns
    built = []
    for i in chosen:
        every = sharegpt.pair_tokens(cache, i)
        pairs = every[: turns_kept(every)]
        built.append(
            Conversation(
                messages=tuple(texts[i][2 * k][1] for k in range(len(pairs))),
                message_tokens=tuple(m for m, _ in pairs),
                max_tokens=tuple(output_len or a for _, a in pairs),
            )
        )
    return built


def synthetic_conversations(
    lengths: RandomLengths, num_conversations: int, num_turns: int, seed: int, tokenizer: Any
) -> list[Conversation]:
    """Conversations of ``num_turns`` turns whose messages and answers have
    `RandomLengths`' lengths, each message text under ``tokenizer`` (`text_of_ids`); the
    shared prefix opens every conversation's first message."""
    if num_turns < 1:
        raise ValueError(f"a conversation needs at least one turn, got {num_turns}")
    if num_turns > 1 and lengths.input_bounds()[0] < 1:
        raise ValueError(
            "a later turn's message could have no token: floor(input length x "
            "(1 - range ratio)) must be >= 1"
        )
    rng = np.random.default_rng(seed)
    prefix = token_prompt(lengths.prefix_len, rng, len(tokenizer))
    built = []
    for _ in range(num_conversations):
        inputs, outputs = lengths.sample(num_turns, rng)
        texts = [
            text_of_ids((prefix if turn == 0 else []) + token_prompt(n, rng, len(tokenizer)),
                        tokenizer)
            for turn, n in enumerate(inputs)
        ]  # fmt: skip
        built.append(
            Conversation(tuple(t for t, _ in texts), tuple(n for _, n in texts), tuple(outputs))
        )
    return built


# -- arrivals -----------------------------------------------------------------------


def send_times(requests: Sequence[BenchRequest], config: LoadConfig) -> np.ndarray:
    """When each request leaves, in seconds from the run's start: its trace arrival times
    ``config.time_scale`` (as the trace's first request arrives at 0, so does the first
    sent), else `arrival_times` of the rate.

    Raises:
        ValueError: a time scale, and a request that has no trace arrival.
    """
    if config.time_scale is None:
        return arrival_times(len(requests), config.request_rate, config.burstiness, config.seed)
    if any(r.arrival_s is None for r in requests):
        raise ValueError("the trace's own timing needs requests read from a trace file")
    return np.array([r.arrival_s for r in requests], dtype=float) * config.time_scale


def arrival_times(num_requests: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times in seconds from the start, the first at 0: gamma gaps with shape
    ``burstiness`` and mean ``1 / rate`` (exponential at burstiness 1), or all zero
    at an infinite rate."""
    if math.isinf(rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


# -- the client -----------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, ``start_s`` from the run's start.

    ``chunk_s`` holds the arrival of every text chunk after the request was sent (so
    TTFT is its first entry and ITL its gaps); ``usage_reported`` says whether the token
    counts are the server's or counted from chunks. A turn of a conversation
    (`run_conversations`) names its ``conversation``, its ``turn`` (0: the first) and
    the ``conversation_turns`` that conversation has; other requests leave them None.
    """

    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0
    success: bool = False
    error: str | None = None
    latency_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_reported: bool = False
    conversation: int | None = None
    turn: int | None = None
    conversation_turns: int | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] if self.success and self.chunk_s else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two)."""
        ttft = self.ttft_s
        if ttft is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - ttft) / (self.output_tokens - 1)


def request_payload(request: BenchRequest, config: LoadConfig) -> dict[str, Any]:
    """The JSON body of one streamed request."""
    payload: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        history = [{"role": role, "content": content} for role, content in request.history]
        payload["messages"] = [*history, {"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _headers(config: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _chunk_text(choice: dict[str, Any]) -> str:
    """The text a streamed choice carries (completions: ``text``; chat: the delta's
    ``content`` or a reasoning model's thinking: ``reasoning_content`` as DeepSeek and
    SGLang name it, ``reasoning`` as vLLM has since it dropped that name, and OpenRouter;
    a server that sends both sends the same text twice)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = _delta(choice)
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return (delta.get("content") or "") + reasoning


def _delta(choice: dict[str, Any]) -> dict[str, Any]:
    return choice.get("delta") or {}


def _error_message(payload: Any) -> str | None:
    """The message of an error body or event in the shapes servers send: OpenAI's
    ``{"error": {"message": ...}}``, TGI's ``{"error": "...", "error_type": ...}``, and
    SGLang's ``{"object": "error", "message": ...}``; None for any other shape."""
    error = payload.get("error", payload) if isinstance(payload, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else None


def _error_text(status: int, body: bytes) -> str:
    """``HTTP 400: <the error's message>`` (`_error_message`), or the body's start when
    it is not JSON of a known shape."""
    try:
        message = _error_message(json.loads(body))
    except ValueError:
        message = None
    if message is None:
        message = body.decode("utf-8", errors="replace").strip()[:200]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


async def send_request(
    client: Any,
    request: BenchRequest,
    record: RequestRecord,
    config: LoadConfig,
    answer: list[str] | None = None,
) -> None:
    """Send one streamed request and fill ``record`` as its chunks arrive (and
    ``answer``, when given, with the text of each)."""
    import httpx

    started = time.perf_counter()
    try:
        # httpx's timeout bounds each read; this one bounds the whole request
        async with asyncio.timeout(config.request_timeout_s):
            async with client.stream(
                "POST",
                ENDPOINTS[config.endpoint],
                json=request_payload(request, config),
                headers=_headers(config),
            ) as response:
                if response.status_code != 200:
                    record.error = _error_text(response.status_code, await response.aread())
                    return
                await _read_stream(response, record, started, answer)
    except (TimeoutError, httpx.TimeoutException):
        record.error = f"timed out after {config.request_timeout_s:g} s"
    except ValueError as error:  # an event that is not JSON, or not a chunk's
        record.error = f"malformed stream event: {error}"
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an event stream as the SSE specification ends them (CR LF, LF or CR
    as bytes), decoded after splitting. Not ``str.splitlines``, which httpx's
    ``aiter_lines`` follows and which also breaks at U+2028, U+0085 and U+001C-U+001E:
    a server that writes such a character raw inside its JSON (pydantic's
    ``model_dump_json`` does; random weights sample them) would be read as a truncated
    event."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = re.split(rb"\r\n|\n|\r(?!$)", pending)
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", errors="replace")


async def _read_stream(
    response: Any, record: RequestRecord, started: float, answer: list[str] | None
) -> None:
    """Read SSE lines up to ``data: [DONE]``: note each text chunk's time (and keep its
    text in ``answer``), take the usage when the server sends it, stop at an error
    event (``data: {"error": ...}``, or llama.cpp's ``error: {...}`` line).

    Raises:
        ValueError: an event that is not JSON, or not the JSON object of a chunk.
    """
    async for line in sse_lines(response.aiter_bytes()):
        is_error = line.startswith("error:")  # llama.cpp's server writes its errors so
        if not (line.startswith("data:") or is_error):
            continue  # blank separators, comments, event names
        data = line.partition(":")[2].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError(f"not a JSON object: {data[:80]}")
        if is_error or "error" in event:
            record.error = f"stream error: {_error_message(event) or event.get('error', data)}"
            return
        try:
            _take_chunk(event, record, time.perf_counter() - started, answer)
        except (AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"not a chunk ({error}): {data[:80]}") from None
    if not record.chunk_s:
        # no TTFT to measure, and goodput would take it for one that met every objective
        # (vLLM's bench serve fails such a request too)
        record.error = "the stream carried no text"
        return
    record.latency_s = time.perf_counter() - started
    if not record.usage_reported:
        record.output_tokens = len(record.chunk_s)
    record.success = True


def _take_chunk(
    event: dict[str, Any], record: RequestRecord, now: float, answer: list[str] | None
) -> None:
    """Note one chunk in ``record``: its time ``now`` when it carries text (and the text
    in ``answer``), and the usage when it has one."""
    choices = event.get("choices") or []
    text = _chunk_text(choices[0]) if choices else ""
    if text:
        record.chunk_s.append(now)
        if answer is not None:  # what a chat client sends back: no reasoning
            answer.append(choices[0].get("text") or _delta(choices[0]).get("content") or "")
    if event.get("usage"):
        record.output_tokens = int(event["usage"].get("completion_tokens", 0))
        record.prompt_tokens = int(event["usage"].get("prompt_tokens", record.prompt_tokens))
        record.usage_reported = True


def fetch_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model that ``GET /v1/models`` lists.

    Raises:
        ValueError: a bad URL.
        ConnectionError: the server cannot be reached.
        BenchError: it answers, but not with a model list.
    """
    import httpx

    base_url = normalize_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise ConnectionError(f"cannot reach {base_url}: {error}") from None
    if response.status_code != 200:
        answer = _error_text(response.status_code, response.content)
        raise BenchError(f"GET {base_url}/v1/models: {answer}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {base_url}/v1/models: no model listed") from None


def _client(config: LoadConfig) -> Any:
    import httpx

    return httpx.AsyncClient(
        base_url=config.base_url,
        timeout=httpx.Timeout(config.request_timeout_s),
        limits=httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=None),
    )


async def _run_async(
    requests: Sequence[BenchRequest],
    config: LoadConfig,
    on_done: Callable[[], None],
) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` on the schedule; returns their records and the run's duration
    (first send to last completion, or to the ``max_duration_s`` bound)."""
    times = send_times(requests, config)
    records = [RequestRecord(i, r.prompt_tokens, r.max_tokens) for i, r in enumerate(requests)]
    limit = asyncio.Semaphore(config.max_concurrency or len(requests))
    async with _client(config) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + float(times[i]) - time.perf_counter()))
            async with limit:
                records[i].start_s = time.perf_counter() - start
                await send_request(client, requests[i], records[i], config)
            on_done()

        tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
        duration = await _until_bound(tasks, start, config)
    _mark_unfinished(records, config)
    return records, duration


async def _until_bound(tasks: list[asyncio.Task[None]], start: float, config: LoadConfig) -> float:
    """Wait for ``tasks`` until the run's ``max_duration_s``, cancel those still going,
    and return the run's duration from ``start``."""
    _, pending = await asyncio.wait(tasks, timeout=config.max_duration_s)
    duration = time.perf_counter() - start
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return duration


def _mark_unfinished(records: list[RequestRecord], config: LoadConfig) -> None:
    """A request the bound cut short failed for that reason (unless it failed first)."""
    for record in records:
        if not record.success and record.error is None:
            record.error = f"unfinished at the {config.max_duration_s:g} s bound of the run"


def run_load(
    requests: Sequence[BenchRequest],
    config: LoadConfig,
    on_done: Callable[[], None] = lambda: None,
) -> tuple[list[RequestRecord], float]:
    """Load the server with ``requests`` (see `LoadConfig`); ``on_done`` is called as each
    request ends (a progress bar). Returns every request's record and the duration.

    Raises:
        ValueError: no requests, or the trace's timing asked of requests without it.
    """
    if not requests:
        raise ValueError("no requests to send")
    send_times(requests, config)  # a schedule that cannot exist fails before any send
    return asyncio.run(_run_async(requests, config, on_done))


def warm_up(requests: Sequence[BenchRequest], config: LoadConfig) -> None:
    """Send ``requests`` (all at once, under the concurrency cap) and drop their records.

    Raises:
        BenchError: every one failed (a wrong model name, a server that refuses the
            payload): the run would measure nothing.
    """
    if not requests:
        return
    at_once = replace(config, request_rate=math.inf, time_scale=None, max_duration_s=None)
    records, _ = run_load(requests, at_once)
    if not any(r.success for r in records):
        raise BenchError(f"every warm-up request failed; the first: {records[0].error}")


def run_conversations(
    conversations: Sequence[Conversation],
    config: LoadConfig,
    on_done: Callable[[], None] = lambda: None,
) -> tuple[list[RequestRecord], float]:
    """Load the server with closed-loop conversations: each starts on the arrival
    schedule of ``config.request_rate`` (all at once at inf), holds one of
    ``config.max_concurrency`` slots until its last turn ends, and sends its turns one
    after another (`_send_turns`), each after the previous answer has ended and
    ``config.think_time_s`` more. ``on_done`` is called as each turn ends. Returns one
    record per turn sent, in the order sent, and the duration (first send to last
    answer, or to the ``max_duration_s`` bound, where the turn in flight is counted
    failed and later turns are not sent).

    Raises:
        ValueError: no conversations, a trace's timing, or the completions endpoint
            (the history is sent as chat messages).
    """
    if not conversations:
        raise ValueError("no conversations to send")
    if config.time_scale is not None:
        raise ValueError("conversations start at a rate: a trace's timing does not apply")
    if config.endpoint != "chat":
        raise ValueError("a conversation's history is sent as chat messages: endpoint chat")
    return asyncio.run(_run_conversations_async(conversations, config, on_done))


async def _run_conversations_async(
    conversations: Sequence[Conversation], config: LoadConfig, on_done: Callable[[], None]
) -> tuple[list[RequestRecord], float]:
    times = arrival_times(len(conversations), config.request_rate, config.burstiness, config.seed)
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(config.max_concurrency or len(conversations))
    async with _client(config) as client:
        start = time.perf_counter()

        async def converse(index: int) -> None:
            await asyncio.sleep(max(0.0, start + float(times[index]) - time.perf_counter()))
            async with limit:
                await _send_turns(client, index, conversations[index], config, start, records,
                                  on_done)  # fmt: skip

        tasks = [asyncio.create_task(converse(i)) for i in range(len(conversations))]
        duration = await _until_bound(tasks, start, config)
    _mark_unfinished(records, config)
    return records, duration


async def _send_turns(
    client: Any,
    index: int,
    conversation: Conversation,
    config: LoadConfig,
    start: float,
    records: list[RequestRecord],
    on_done: Callable[[], None],
) -> None:
    """Send one conversation's turns in order, each with the whole history before it:
    every earlier message and the server's answer to it. A turn's record joins
    ``records`` as it is sent (so a run cut at its bound counts it); the first turn that
    fails ends the conversation, as there is no answer to go on with."""
    history: tuple[tuple[str, str], ...] = ()
    context_tokens = 0  # the history's tokens: the server's count of the last prompt, if given
    for turn in range(conversation.num_turns):
        if turn and config.think_time_s:
            await asyncio.sleep(config.think_time_s)
        message = conversation.messages[turn]
        request = BenchRequest(
            message,
            context_tokens + conversation.message_tokens[turn],
            conversation.max_tokens[turn],
            history=history,
        )
        record = RequestRecord(
            len(records), request.prompt_tokens, request.max_tokens, conversation=index,
            turn=turn, conversation_turns=conversation.num_turns,
        )  # fmt: skip
        records.append(record)
        record.start_s = time.perf_counter() - start
        answer: list[str] = []
        await send_request(client, request, record, config, answer)
        on_done()
        if not record.success:
            return
        history = (*history, ("user", message), ("assistant", "".join(answer)))
        context_tokens = record.prompt_tokens + record.output_tokens


# -- metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Goodput:
    """Latency objectives of goodput in milliseconds (None: not an objective)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        """Whether a successful request meets every objective (a request of one token
        has no TPOT and meets that objective, as in vLLM)."""
        ttft, tpot, e2e = record.ttft_s or 0.0, record.tpot_s or 0.0, record.latency_s or 0.0
        checks = ((self.ttft_ms, ttft), (self.tpot_ms, tpot), (self.e2e_ms, e2e))
        return record.success and all(s is None or value * 1e3 <= s for s, value in checks)


def parse_goodput(items: Sequence[str]) -> Goodput:
    """``ttft:MS``, ``tpot:MS``, ``e2e:MS`` (vLLM's ``e2el`` too), each at most once.

    Raises:
        ValueError: an unknown metric, a value that is not a positive number, a repeat.
    """
    values: dict[str, float] = {}
    for item in items:
        name, _, text = item.partition(":")
        name = "e2e" if name.strip() == "e2el" else name.strip()
        if name not in GOODPUT_METRICS or not text:
            raise ValueError(f"bad goodput objective {item!r}: write ttft:MS tpot:MS e2e:MS")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value < math.inf:
            raise ValueError(f"bad goodput objective {item!r}: MS must be a positive number")
        if name in values:
            raise ValueError(f"goodput objective {name} given twice")
        values[name] = value
    return Goodput(values.get("ttft"), values.get("tpot"), values.get("e2e"))


def distribution(values_ms: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """Mean, median and the percentiles (``p50``, ``p99.9``) of ``values_ms`` (NaN when
    there are none, so a table shows the gap rather than a zero)."""
    data = np.asarray(values_ms, dtype=float)
    stats = {"mean": float(data.mean()) if data.size else math.nan}
    stats["median"] = float(np.median(data)) if data.size else math.nan
    for p in percentiles:
        stats[f"p{p:g}"] = float(np.percentile(data, p)) if data.size else math.nan
    return stats


def metric_values_ms(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """Every value of ``metric`` (one of `METRICS`) over the successful requests, in ms."""
    ok = [r for r in records if r.success]
    if metric == "ttft":
        return [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    if metric == "tpot":
        return [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]
    if metric == "itl":
        return [gap * 1e3 for r in ok for gap in r.itl_s]
    if metric == "e2e":
        return [r.latency_s * 1e3 for r in ok if r.latency_s is not None]
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput: Goodput | None = None,
) -> dict[str, Any]:
    """One rate's figures: counts, throughputs per second of ``duration_s``, goodput
    (None without objectives), the first distinct errors with their counts, and each
    latency distribution in ms."""
    ok = [r for r in records if r.success]
    errors = Counter(r.error for r in records if not r.success)
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": [{"message": m, "count": c} for m, c in errors.most_common(MAX_ERRORS_KEPT)],
        "duration_s": duration_s,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "request_throughput": len(ok) * per_s,
        "input_token_throughput": sum(r.prompt_tokens for r in ok) * per_s,
        "output_token_throughput": sum(r.output_tokens for r in ok) * per_s,
        "goodput": sum(goodput.met_by(r) for r in ok) * per_s if goodput else None,
        "usage_reported": all(r.usage_reported for r in ok),
    }
    for metric in METRICS:
        summary[f"{metric}_ms"] = distribution(metric_values_ms(records, metric), percentiles)
    is_conversation = any(r.turn is not None for r in records)
    summary["turns"] = turn_summary(records, percentiles) if is_conversation else None
    return summary


def turn_summary(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict[str, Any]:
    """What conversations add to a summary: how many started and how many had every
    turn answered; the TTFT of first turns and of later ones, whose prompts open with a
    history the server has seen (its prefix cache shows in the difference); and per turn
    index (0: the first) its counts, mean prompt tokens and TTFT, in ms."""
    turns = [r for r in records if r.turn is not None]
    answered: Counter[int | None] = Counter(r.conversation for r in turns if r.success)
    started = {r.conversation: r.conversation_turns for r in turns}
    by_turn = []
    for turn in sorted({r.turn for r in turns if r.turn is not None}):
        these = [r for r in turns if r.turn == turn]
        ok = [r for r in these if r.success]
        by_turn.append({
            "turn": turn,
            "completed": len(ok),
            "failed": len(these) - len(ok),
            "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in ok])) if ok else math.nan,
            "ttft_ms": distribution(metric_values_ms(these, "ttft"), percentiles),
        })  # fmt: skip
    return {
        "conversations": len(started),
        "conversations_completed": sum(answered[c] == n for c, n in started.items()),
        "ttft_first_turn_ms": distribution(
            metric_values_ms([r for r in turns if r.turn == 0], "ttft"), percentiles
        ),
        "ttft_later_turns_ms": distribution(
            metric_values_ms([r for r in turns if r.turn], "ttft"), percentiles
        ),
        "by_turn": by_turn,
    }


# -- results ---------------------------------------------------------------------------


TRACE_RATE = "trace"
"""The request rate that sends each request at its trace arrival (`LoadConfig.time_scale`)."""


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def load_label(config: LoadConfig) -> str:
    """The schedule of a run as its result names it: a rate (`rate_label`) or `TRACE_RATE`."""
    return TRACE_RATE if config.time_scale is not None else rate_label(config.request_rate)


def rate_result(
    config: LoadConfig,
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float],
    goodput: Goodput | None,
) -> dict[str, Any]:
    """One rate's entry of a saved result: its load, summary and raw records
    (``request_rate`` `TRACE_RATE` with its ``time_scale`` for the trace's own timing)."""
    return {
        "request_rate": load_label(config),
        "time_scale": config.time_scale,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "summary": summarize(records, duration_s, percentiles, goodput),
        "requests": [asdict(r) for r in records],
    }


def save_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a result atomically (`write_atomic`), NaN written as null."""
    write_atomic(Path(path), _without_nan(result))


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a saved result back.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not an ``avmp bench serve`` result.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 JSON file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
        raise ValueError(f"{path}: not an avmp bench serve result (schema {RESULT_SCHEMA})")
    return data


def records_of(rate_entry: dict[str, Any]) -> list[RequestRecord]:
    """The raw records of one rate of a loaded result."""
    return [RequestRecord(**r) for r in rate_entry["requests"]]
