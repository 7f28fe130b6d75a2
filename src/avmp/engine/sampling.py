"""Turning logits into next tokens: greedy, or temperature with nucleus (top-p) sampling.

Each request samples from its own seeded generator, so its tokens do not depend on what
else shares the batch, nor on whether it was preempted and recomputed (tokens already
sampled are kept, never drawn again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy (argmax).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: base seed; request ``i`` samples from a generator seeded ``seed + i``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

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


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """Next token ``[N]`` per row of ``logits [N, V]``; row ``i`` draws from ``generators[i]``."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / params.temperature, dim=-1), params.top_p)
    rows = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    return torch.cat(rows)


class SampledTokens:
    """A step's sampled tokens on their way to the host.

    The engine reads step N's tokens only after it has launched step N+1, so the device
    never waits for the host: on CUDA the tokens are copied into pinned memory without
    blocking and `tolist` waits for that copy alone. ``device`` keeps the tokens on the
    device, where step N+1 reads them as its input ids.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.device = tokens
        self._event: torch.cuda.Event | None = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return [int(t) for t in self._host.tolist()]
