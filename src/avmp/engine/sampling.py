"""Turning logits into next tokens: greedy, or temperature with top-k and nucleus (top-p)
sampling, each row of a batch with its own settings.

Each request samples from its own seeded generator and its row's probabilities are
computed from its own logits and settings alone, so its tokens do not depend on what
else shares the batch, nor on whether it was preempted and recomputed (tokens already
sampled are kept, never drawn again).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy (argmax).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``.
        top_k: keep the ``top_k`` most likely tokens before top-p (0: off).
        min_p: keep the tokens at least ``min_p`` times as likely as the most likely one
            (0: off), before top-k and top-p, as vLLM orders them.
        seed: the generator's seed (`Engine.generate`: request ``i`` samples from a
            generator seeded ``seed + i``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs [N, V]`` outside the top-p nucleus (then renormalise)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _per_row(values: list[Any], device: torch.device) -> torch.Tensor:
    """A small host list as a ``[N, 1]`` tensor on ``device``. On CUDA through pinned
    memory without blocking: a plain copy would wait for the device, and the engine
    samples while the previous step may still run there."""
    host = torch.tensor(values)[:, None]
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def filtered_probs(logits: torch.Tensor, rows: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities ``[N, V]`` of the sampled rows of ``logits [N, V]``, row ``i`` with
    ``rows[i]``'s temperature, min-p, top-k and top-p, all rows at once on the device. A row
    whose filters are off keeps its softmax untouched (not renormalised), so a row's
    values never depend on the other rows' settings."""
    device = logits.device
    temperature = _per_row([p.temperature for p in rows], device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cuts_min = [p.min_p > 0.0 for p in rows]
    if any(cuts_min):
        floor = _per_row([p.min_p for p in rows], device) * probs.amax(dim=-1, keepdim=True)
        kept = probs.masked_fill(probs < floor, 0.0)
        probs = torch.where(_per_row(cuts_min, device), kept / kept.sum(-1, keepdim=True), probs)
    vocab = probs.shape[-1]
    cuts_k = [0 < p.top_k < vocab for p in rows]
    cuts_p = [p.top_p < 1.0 for p in rows]
    if not any(cuts_k) and not any(cuts_p):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if any(cuts_k):
        kept = [p.top_k if cut else vocab for p, cut in zip(rows, cuts_k, strict=True)]
        ranks = torch.arange(vocab, device=device)[None, :]
        sorted_probs = sorted_probs.masked_fill(ranks >= _per_row(kept, device), 0.0)
        # top-p then reads the mass of the k kept tokens (vLLM's order: k, then p)
        has_k = _per_row(cuts_k, device)
        renormed = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs = torch.where(has_k, renormed, sorted_probs)
    if any(cuts_p):
        top_p = _per_row([p.top_p for p in rows], device)
        has_p = _per_row(cuts_p, device)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill((before >= top_p) & has_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    changed = _per_row([k or p for k, p in zip(cuts_k, cuts_p, strict=True)], device)
    return torch.where(changed, filtered / filtered.sum(dim=-1, keepdim=True), probs)


def steered_logits(
    logits: torch.Tensor, rows: Sequence[tuple[int, Iterable[tuple[int, float]]]]
) -> torch.Tensor:
    """``logits [N, V]`` with (token id, amount) added to the given rows: a request's
    ``logit_bias``, and -inf for the end-of-sequence and stop ids of one that has not
    reached its ``min_tokens``. A copy: the runner's logits may be a CUDA graph's output
    buffer. Ids beyond the vocabulary are skipped."""
    vocab = logits.shape[-1]
    found = [(row, token, float(amount)) for row, pairs in rows for token, amount in pairs
             if 0 <= token < vocab]  # fmt: skip
    if not found:
        return logits
    index = torch.tensor([(r, t) for r, t, _ in found], dtype=torch.long)
    amounts = torch.tensor([a for _, _, a in found], dtype=logits.dtype)
    index, amounts = index.to(logits.device), amounts.to(logits.device)
    return logits.index_put((index[:, 0], index[:, 1]), amounts, accumulate=True)


class PenaltyCounts:
    """The device-side state of the requests with penalties (OpenAI's
    ``frequency_penalty`` and ``presence_penalty``, vLLM's ``repetition_penalty``): per
    request a row of its output tokens' counts and a row marking its prompt's tokens, in
    one table that grows as requests join. The counts are updated on the device from the
    sampled tokens themselves, so the host never reads a token to count it and no token
    is counted late (the engine samples step N+1 before it reads step N's tokens).
    """

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self._counts = torch.zeros(0, vocab, dtype=torch.float32, device=device)
        self._prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self._rows: dict[int, int] = {}  # request id -> its row
        self._free: list[int] = []

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, request_id: int, prompt: Sequence[int]) -> None:
        """Give a request a row: no output yet, its prompt's tokens marked."""
        if not self._free:
            grown = max(4, 2 * len(self._counts))
            self._free = list(range(grown - 1, len(self._counts) - 1, -1))
            self._counts = _grown(self._counts, grown)
            self._prompt = _grown(self._prompt, grown)
        row = self._free.pop()
        self._rows[request_id] = row
        ids = torch.tensor([t for t in prompt if 0 <= t < self.vocab], dtype=torch.long)
        self._prompt[row, ids.to(self.device)] = True

    def remove(self, request_id: int) -> None:
        """Free a request's row (nothing if it has none)."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._counts[row].zero_()
            self._prompt[row].zero_()
            self._free.append(row)

    def apply(
        self, logits: torch.Tensor, rows: Sequence[tuple[int, int, tuple[float, float, float]]]
    ) -> torch.Tensor:
        """``logits [N, V]`` with each (logits row, request id, (frequency, presence,
        repetition)) penalised as vLLM does it: the repetition penalty divides a positive
        logit (multiplies a negative one) of every token in the prompt or the output,
        then each output token's count times the frequency penalty and, once it occurs,
        the presence penalty are subtracted. A copy."""
        if not rows:
            return logits
        device = logits.device
        index = torch.tensor([r for r, _, _ in rows], dtype=torch.long).to(device)
        table = torch.tensor([self._rows[q] for _, q, _ in rows], dtype=torch.long).to(device)
        factors = torch.tensor([f for _, _, f in rows], dtype=torch.float32).to(device)
        counts = self._counts.index_select(0, table)
        occurred = counts > 0
        selected = logits.index_select(0, index).float()
        repetition = factors[:, 2:3]
        scaled = torch.where(selected > 0, selected / repetition, selected * repetition)
        selected = torch.where(occurred | self._prompt.index_select(0, table), scaled, selected)
        selected = selected - factors[:, 0:1] * counts - factors[:, 1:2] * occurred.float()
        return logits.index_copy(0, index, selected.to(logits.dtype))

    def count(self, rows: Sequence[tuple[int, int]], sampled: torch.Tensor) -> None:
        """Count the tokens just sampled: (row of ``sampled``, request id) pairs."""
        if not rows:
            return
        device = sampled.device
        which = torch.tensor([self._rows[q] for _, q in rows], dtype=torch.long).to(device)
        tokens = sampled.index_select(0, torch.tensor([r for r, _ in rows]).to(device))
        ones = torch.ones(len(rows), dtype=torch.float32, device=device)
        self._counts.index_put_((which, tokens), ones, accumulate=True)


def _grown(table: torch.Tensor, rows: int) -> torch.Tensor:
    grown = torch.zeros(rows, table.shape[1], dtype=table.dtype, device=table.device)
    grown[: len(table)] = table
    return grown


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token ``[N]`` per row of ``logits [N, V]``.

    Args:
        params: one setting for every row, or one per row; greedy rows take the argmax.
        generators: per row, the generator its draw uses (None for greedy rows).
    """
    rows = [params] * logits.shape[0] if isinstance(params, SamplingParams) else list(params)
    if len(rows) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"{len(rows)} settings, {len(generators)} generators, {logits.shape[0]} rows"
        )
    sampled = [i for i, p in enumerate(rows) if not p.is_greedy]
    if not sampled:
        return logits.argmax(dim=-1)
    everyone = len(sampled) == len(rows)
    index = None if everyone else _per_row(sampled, logits.device)[:, 0]
    subset = logits if index is None else logits.index_select(0, index)
    probs = filtered_probs(subset, [rows[i] for i in sampled])
    # one draw per row: each request's generator is its own (no batched multinomial
    # takes a generator per row)
    draws = torch.cat(
        [
            torch.multinomial(p, 1, generator=generators[i])
            for p, i in zip(probs, sampled, strict=True)
        ]
    )
    if index is None:
        return draws
    return logits.argmax(dim=-1).index_copy(0, index, draws)


class _HostCopy:
    """Tensors copied to the host without blocking: on CUDA into pinned memory behind an
    event, which `read` waits for alone (on the CPU the tensors themselves)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            self._host = tuple(
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in tensors
            )
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        else:
            self._host = tensors

    def read(self) -> tuple[torch.Tensor, ...]:
        if self._event is not None:
            self._event.synchronize()
        return self._host


class SampledTokens:
    """A step's sampled tokens on their way to the host.

    The engine reads step N's tokens only after it has launched step N+1, so the device
    never waits for the host: on CUDA the tokens are copied into pinned memory without
    blocking and `tolist` waits for that copy alone. ``device`` keeps the tokens on the
    device, where step N+1 reads them as its input ids.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.device = tokens
        self._copy = _HostCopy(tokens)

    def tolist(self) -> list[int]:
        return [int(t) for t in self._copy.read()[0].tolist()]


MAX_LOGPROBS = 20  # most likely tokens a request may ask for per position (vLLM's default)
# Prompt rows whose log-softmax is taken at once: a prefill chunk's rows at a time would
# add another [chunk, vocab] float32 tensor beside its logits.
PROMPT_LOGPROB_ROWS = 256


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability and the ``k`` most likely tokens' (id, log-probability),
    most likely first, under the model's own distribution (the raw logits' log-softmax,
    before temperature, top-k/top-p and ``min_tokens``' mask: what vLLM reports by
    default). ``rank``: the token's place in that distribution (1: the most likely; the
    tokens strictly more likely, plus one, as vLLM counts), given for prompt tokens."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


class SampledLogprobs:
    """The log-probabilities of some rows' sampled tokens, and of their top ``k``, on their
    way to the host like `SampledTokens`.

    Args:
        logits: the step's raw logits ``[N, V]``.
        tokens: the tokens sampled from them ``[N]``.
        rows: per request that asked, its row and its ``k`` (0: the sampled token alone).
    """

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor,
                 rows: Sequence[tuple[int, int]]) -> None:  # fmt: skip
        self._ks = [k for _, k in rows]
        index = torch.tensor([row for row, _ in rows], dtype=torch.long).to(logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
        top, ids = logprobs.topk(min(max(self._ks), logprobs.shape[-1]), dim=-1)  # k = 0: empty
        self._copy = _HostCopy(chosen, top, ids)

    def tolist(self) -> list[TokenLogprobs]:
        """One per row given, in its order."""
        chosen, top, ids = (t.tolist() for t in self._copy.read())
        out = []
        for logprob, values, tokens, k in zip(chosen, top, ids, self._ks, strict=True):
            pairs = zip((int(t) for t in tokens[:k]), (float(v) for v in values[:k]), strict=True)
            out.append(TokenLogprobs(float(logprob), tuple(pairs)))
        return out


class PromptLogprobs:
    """The log-probabilities of prompt tokens under the logits of the rows before them,
    their ranks and the ``k`` most likely tokens there, on their way to the host like
    `SampledLogprobs`. The log-softmax is taken `PROMPT_LOGPROB_ROWS` rows at a time.

    Args:
        logits: raw logits ``[R, V]``, row ``i`` predicting ``targets[i]``.
        targets: the prompt token each row predicts.
        ks: per row, how many most likely tokens to keep (0: the target's alone).
    """

    def __init__(self, logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int]) -> None:
        self._ks = list(ks)
        device = logits.device
        index = torch.tensor(list(targets), dtype=torch.long).to(device)[:, None]
        k = min(max(self._ks, default=0), logits.shape[-1])
        parts: list[tuple[torch.Tensor, ...]] = []
        for at in range(0, logits.shape[0], PROMPT_LOGPROB_ROWS):
            rows = slice(at, at + PROMPT_LOGPROB_ROWS)
            logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [r, V]
            chosen = logprobs.gather(1, index[rows])  # [r, 1]
            rank = (logprobs > chosen).sum(dim=-1) + 1
            top, ids = logprobs.topk(k, dim=-1)  # k = 0: empty
            parts.append((chosen[:, 0], rank, top, ids))
        self._copy = _HostCopy(*(torch.cat(column) for column in zip(*parts, strict=True)))

    def tolist(self) -> list[TokenLogprobs]:
        """One per row, in row order."""
        chosen, rank, top, ids = (t.tolist() for t in self._copy.read())
        out = []
        for logprob, place, values, tokens, k in zip(chosen, rank, top, ids, self._ks, strict=True):
            pairs = zip((int(t) for t in tokens[:k]), (float(v) for v in values[:k]), strict=True)
            out.append(TokenLogprobs(float(logprob), tuple(pairs), int(place)))
        return out
