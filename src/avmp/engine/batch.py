"""What one forward pass of the engine computes, and where its caches live.

A step flattens the new tokens of every scheduled sequence into one ``[T]`` array (no
padding); `StepBatch` says which slice belongs to which sequence, where that sequence's
KV pages and state slot are, and how many of its tokens are already cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class LayerCaches(Protocol):
    """What a layer reads its cache through: per-layer tensors over the two pools,
    indexed by page row (KV) or slot row (state).

    Views are built once: they span each pool's whole range, so migration (chunks mapped
    behind them) and compaction (units copied inside them) never invalidate them.
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
class DecodeGroup:
    """The step's decode sequences, batched so each layer handles them in one call.

    Attributes:
        token_index: ``[N]`` position of each one's token in the flat token array.
        slots: ``[N]`` their state slots.
        block_tables: ``[N, max_pages]`` their pages, padded with page 0.
        num_tokens: ``[N]`` tokens each holds once this step's token is written.
    """

    token_index: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.token_index.shape[0])


@dataclass(frozen=True)
class StepBatch:
    """All sequences of a step plus per-token tensors shared by every layer.

    Attributes:
        sequences: in the order of the flat token array.
        positions: ``[T]`` absolute position of each token.
        page_ids, page_offsets: ``[T]`` where each token's K/V goes.
        decode: the decode sequences as one batch (None if there are none, or if the
            batch was built elsewhere: then layers take every sequence one by one).
    """

    sequences: tuple[SequenceChunk, ...]
    positions: torch.Tensor
    page_ids: torch.Tensor
    page_offsets: torch.Tensor
    decode: DecodeGroup | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def per_sequence(self) -> tuple[SequenceChunk, ...]:
        """Sequences a layer handles one by one: all but the batched decode group (every
        sequence when the batch was built without one)."""
        if self.decode is None:
            return self.sequences
        return tuple(seq for seq in self.sequences if not seq.is_decode)

    @classmethod
    def build(
        cls,
        chunks: list[tuple[int, int, int, list[int]]],
        block_size: int,
        device: torch.device,
    ) -> StepBatch:
        """Build a batch from ``(num_context, num_tokens, slot, pages)`` per sequence.

        Index tensors are built on the host and copied once each.
        """
        sequences = []
        positions: list[int] = []
        page_ids: list[int] = []
        start = 0
        for num_context, num_tokens, slot, pages in chunks:
            table = torch.tensor(pages, dtype=torch.long, device=device)
            sequences.append(SequenceChunk(start, num_tokens, num_context, slot, table))
            seq_positions = range(num_context, num_context + num_tokens)
            positions.extend(seq_positions)
            page_ids.extend(pages[p // block_size] if pages else 0 for p in seq_positions)
            start += num_tokens
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        pages_t = torch.tensor(page_ids, dtype=torch.long, device=device)
        decode = _decode_group(chunks, sequences, device)
        return cls(tuple(sequences), pos, pages_t, pos % block_size, decode)


def _decode_group(
    chunks: list[tuple[int, int, int, list[int]]],
    sequences: list[SequenceChunk],
    device: torch.device,
) -> DecodeGroup | None:
    picked = [i for i, seq in enumerate(sequences) if seq.is_decode]
    if not picked:
        return None
    width = max(len(chunks[i][3]) for i in picked)
    tables = [chunks[i][3] + [0] * (width - len(chunks[i][3])) for i in picked]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return DecodeGroup(
        token_index=tensor([sequences[i].start for i in picked]),
        slots=tensor([sequences[i].slot for i in picked]),
        block_tables=tensor(tables),
        num_tokens=tensor([sequences[i].num_context + 1 for i in picked]),
    )
