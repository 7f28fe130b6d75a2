"""Runs the model on one step: flattens the scheduled chunks into a `StepBatch`, runs the
forward pass over the cache views, and returns the logits of the sequences that sample.

The runner knows rows, not allocator indices: the engine translates a request's slot and
pages into view rows (`PoolViews.slot_row`) right after scheduling, when the allocator's
indices are current (compaction happens only while the scheduler allocates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avmp.engine.batch import StepBatch
from avmp.engine.models.base import HybridModel
from avmp.memory.backing.views import BackingViews
from avmp.memory.spec import PoolKind


class PoolViews:
    """The engine's `LayerCaches` over an AVMP backing's per-layer views."""

    def __init__(self, views: BackingViews) -> None:
        if views.backing.is_reversed(PoolKind.KV):
            raise ValueError("a KV pool stored in reverse is not supported")
        self.views = views

    def kv(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.views.attention[layer_index]
        return layer.k, layer.v

    def state(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and SSM state; the one a layer does not cache (lightning attention has no
        conv, a short convolution no SSM state) is an empty ``[max_slots, 0]`` tensor."""
        layer = self.views.recurrent[layer_index]
        return _or_empty(layer.conv, layer.ssm), _or_empty(layer.ssm, layer.conv)

    def slot_row(self, slot: int) -> int:
        return self.views.slot_row(slot)

    def page_rows(self, pages: tuple[int, ...]) -> list[int]:
        """Rows of pages: the KV pool is never stored in reverse, so rows are the
        indices (no per-page call: the engine asks for every request at every step)."""
        return list(pages)


def _or_empty(tensor: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor:
    if tensor is not None:
        return tensor
    assert other is not None  # a recurrent layer caches at least one tensor
    return other.new_empty((other.shape[0], 0))


def fill_carried(input_ids: torch.Tensor, carried: torch.Tensor | None) -> None:
    """Replace each carried id ``-1 - i`` of ``input_ids`` by ``carried[i]``, in place
    and on the device: the engine launches a step before it has read the tokens of the
    one before, whose sampled tokens ``carried`` still are."""
    if carried is None or carried.numel() == 0:
        return
    index = (-1 - input_ids).clamp_(min=0)  # other ids read carried[0], unused
    torch.where(input_ids < 0, carried[index], input_ids, out=input_ids)


@dataclass(frozen=True)
class SequenceWork:
    """One sequence's share of a step, in view rows.

    Attributes:
        token_ids: the new tokens to compute (``-1 - i``: the previous step's i-th
            sampled token, still on the device).
        num_context: tokens already in the cache before them.
        slot_row: the row of its state slot.
        page_rows: the rows of its pages, in token order.
        samples: whether the step ends at its last known token (so it samples one).
        logit_rows: rows of ``token_ids`` (indices into them) whose logits the step
            returns too, after the sampled rows: the prompt positions whose next
            token's log-probability a request asked for.
    """

    token_ids: list[int]
    num_context: int
    slot_row: int
    page_rows: list[int]
    samples: bool
    logit_rows: range = range(0)


def logit_row_index(work: list[SequenceWork]) -> list[int]:
    """The step's rows (in its flattened tokens) of every sequence's ``logit_rows``, in
    ``work`` order."""
    rows: list[int] = []
    start = 0
    for w in work:
        rows += [start + row for row in w.logit_rows]
        start += len(w.token_ids)
    return rows


class ModelRunner:
    """Executes steps of one model over one set of cache views."""

    def __init__(
        self, model: HybridModel, cache: PoolViews, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = device
        self.ops = model.ops  # what the engine gave the model for this runner

    def own_ops(self) -> None:
        """Give the model this runner's kernels again if another engine on the same
        model gave it its own since (each engine sets the model's ops when built)."""
        if self.model.ops is not self.ops:
            self.model.use_ops(self.ops)

    @torch.inference_mode()
    def execute(
        self, work: list[SequenceWork], carried: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step. Returns ``[num_sampling + num_logit_rows, vocab]`` float32
        logits: one row per sequence with ``samples`` set, in ``work`` order, then the
        rows of every sequence's ``logit_rows`` (`logit_row_index`).

        A token id ``-1 - i`` in ``work`` stands for ``carried[i]``: a token the previous
        step sampled that the host has not read yet (see `fill_carried`).
        """
        self.own_ops()
        chunks = [(w.num_context, len(w.token_ids), w.slot_row, w.page_rows) for w in work]
        batch = StepBatch.build(chunks, self.block_size, self.device)
        flat = [token for w in work for token in w.token_ids]
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        fill_carried(input_ids, carried)
        hidden = self.model(input_ids, batch, self.cache)  # [T, hidden]
        last = [
            seq.start + seq.num_tokens - 1
            for seq, w in zip(batch.sequences, work, strict=True)
            if w.samples
        ] + logit_row_index(work)
        if not last:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        index = torch.tensor(last, dtype=torch.long, device=self.device)
        return self.model.logits(hidden.index_select(0, index))
