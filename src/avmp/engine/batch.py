"""What one forward pass of the engine computes, and where its caches live.

A step flattens the new tokens of every scheduled sequence into one ``[T]`` array (no
padding); `StepBatch` says which slice belongs to which sequence, where that sequence's
KV pages and state slot are, and how many of its tokens are already cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class CacheViews(Protocol):
    """Per-layer tensors over the two pools, indexed by page (KV) or slot (state).

    Views are valid until the pools change shape or move (migration, compaction); the
    runner asks for fresh ones every step.
    """

    def kv(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of an attention layer, each ``[num_pages, block_size, kv_heads, head_dim]``."""
        ...

    def state(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and SSM state of a recurrent layer: ``[num_slots, channels, columns]`` and
        ``[num_slots, *ssm_shape]``."""
        ...


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step.

    Attributes:
        start: offset of its first new token in the step's flat token array.
        num_tokens: new tokens computed this step (a prefill chunk, or 1 for decode).
        num_context: tokens of this sequence already in the cache.
        slot: its state slot.
        block_table: its pages in token order, covering ``num_context + num_tokens`` tokens.
    """

    start: int
    num_tokens: int
    num_context: int
    slot: int
    block_table: torch.Tensor

    @property
    def tokens(self) -> slice:
        return slice(self.start, self.start + self.num_tokens)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.num_context > 0


@dataclass(frozen=True)
class StepBatch:
    """All sequences of a step plus per-token tensors shared by every layer.

    Attributes:
        sequences: in the order of the flat token array.
        positions: ``[T]`` absolute position of each token.
        page_ids, page_offsets: ``[T]`` where each token's K/V goes.
    """

    sequences: tuple[SequenceChunk, ...]
    positions: torch.Tensor
    page_ids: torch.Tensor
    page_offsets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(
        cls,
        chunks: list[tuple[int, int, int, list[int]]],
        block_size: int,
        device: torch.device,
    ) -> StepBatch:
        """Build a batch from ``(num_context, num_tokens, slot, pages)`` per sequence."""
        sequences = []
        positions: list[int] = []
        start = 0
        for num_context, num_tokens, slot, pages in chunks:
            table = torch.tensor(pages, dtype=torch.long, device=device)
            sequences.append(SequenceChunk(start, num_tokens, num_context, slot, table))
            positions.extend(range(num_context, num_context + num_tokens))
            start += num_tokens
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        page_ids = torch.zeros_like(pos)
        for seq in sequences:
            seq_pos = pos[seq.tokens]
            if seq.block_table.numel():
                page_ids[seq.tokens] = seq.block_table[seq_pos // block_size]
        return cls(tuple(sequences), pos, page_ids, pos % block_size)
