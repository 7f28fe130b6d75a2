"""A step's inputs built on the host in one packed int64 array and copied to the device
once: token ids, positions, slot mapping, block tables, context lengths, query offsets,
state slots and which rows sample.

`DeviceStepBatch` is a `StepBatch` whose per-sequence block tables are views into that
one device copy (no per-sequence transfer); `avmp.engine.triton_ops.TritonOps` reads
its fields. Every index the Triton kernels read is a device tensor,
so no layer synchronises with the host. Padding rows (CUDA graphs replay at a few fixed
batch sizes) carry slot -1 and context 0: every kernel skips them.

A padded step (`device_batch` with ``padded``, what a CUDA graph captures) names no
sequences: the layers read the device arrays alone, at their padded sizes, so one
captured step replays any batch that fits its bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import torch

from avmp.engine.batch import DecodeGroup, SequenceChunk, StepBatch
from avmp.engine.runner import SequenceWork
from avmp.units import round_up

# Every field of a packed step starts at a multiple of 16 bytes (two int64 elements):
# Triton compiles a kernel once per pointer alignment class (16-byte aligned or not), so
# with fields packed end to end, a step whose sizes moved a field into the other class
# made the kernels reading it (slots, query offsets, block tables, context lengths)
# compile again, mid-run.
FIELD_ALIGN = 2


class StepShape(NamedTuple):
    """Sizes of a packed step: tokens, sequences, block-table width, sampled rows."""

    num_tokens: int
    num_seqs: int
    width: int
    num_samples: int

    def field_sizes(self) -> tuple[int, ...]:
        """Elements of each field of `PackedStep`, in order."""
        t, b, w, s = self
        return (t, t, t, b * w, b, b + 1, b, b, b, b, b, s)

    @property
    def total(self) -> int:
        """Elements of the packed buffer: every field rounded up to `FIELD_ALIGN`."""
        return sum(round_up(size, FIELD_ALIGN) for size in self.field_sizes())


class PackedStep(NamedTuple):
    """Named slices of one packed buffer (host or device); see `pack_step`."""

    input_ids: Any
    positions: Any
    slot_mapping: Any
    block_tables: Any
    context_lens: Any
    query_start_loc: Any
    slot_idx: Any
    has_initial_state: Any
    decode_rows: Any
    decode_slots: Any
    decode_seqs: Any
    sample_rows: Any


def split_packed(buffer: Any, shape: StepShape) -> PackedStep:
    """Slice ``buffer`` (numpy array or tensor of ``shape.total`` int64) into its fields."""
    parts = []
    start = 0
    for size in shape.field_sizes():
        parts.append(buffer[start : start + size])
        start += round_up(size, FIELD_ALIGN)
    parts[3] = parts[3].reshape(shape.num_seqs, shape.width)
    return PackedStep(*parts)


def pack_step(
    sequences: list[SequenceWork],
    block_size: int,
    out: np.ndarray,
    shape: StepShape,
) -> None:
    """Fill ``out[:shape.total]`` for ``sequences`` padded to ``shape`` (extra sequences
    and tokens are padding: slot -1, context 0, token 0).

    Vectorised over the whole step (a fixed number of numpy calls whatever the batch):
    a decode step of 256 requests costs tens of microseconds here, not milliseconds.
    """
    fields = split_packed(out, shape)
    b = len(sequences)
    lens = np.fromiter((len(s.token_ids) for s in sequences), np.int64, b)
    context = np.fromiter((s.num_context for s in sequences), np.int64, b)
    num_pages = np.fromiter((len(s.page_rows) for s in sequences), np.int64, b)
    tokens = int(lens.sum())
    ends = np.cumsum(lens)
    starts = ends - lens
    owner = np.repeat(np.arange(b), lens)  # sequence of each token
    positions = np.arange(tokens, dtype=np.int64) - starts[owner] + context[owner]

    fields.block_tables[:] = 0
    pages = np.fromiter(chain.from_iterable(s.page_rows for s in sequences), np.int64)
    page_owner = np.repeat(np.arange(b), num_pages)
    page_col = np.arange(pages.shape[0]) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
    fields.block_tables[page_owner, page_col] = pages

    fields.input_ids[:tokens] = np.fromiter(
        chain.from_iterable(s.token_ids for s in sequences), np.int64, tokens
    )
    fields.input_ids[tokens:] = 0
    fields.positions[:tokens] = positions
    fields.positions[tokens:] = 0
    page_of_token = fields.block_tables[owner, positions // block_size]
    fields.slot_mapping[:tokens] = page_of_token * block_size + positions % block_size
    fields.slot_mapping[tokens:] = -1
    fields.context_lens[:b] = context + lens
    fields.context_lens[b:] = 0
    fields.slot_idx[:b] = np.fromiter((s.slot_row for s in sequences), np.int64, b)
    fields.slot_idx[b:] = -1
    fields.has_initial_state[:b] = context > 0
    fields.has_initial_state[b:] = 0
    decoding = (lens == 1) & (context > 0)  # one token after cached context
    num_decode = int(decoding.sum())
    fields.decode_rows[:num_decode] = ends[decoding] - 1
    fields.decode_rows[num_decode:] = 0
    fields.decode_slots[:num_decode] = fields.slot_idx[:b][decoding]
    fields.decode_slots[num_decode:] = -1
    fields.decode_seqs[:num_decode] = np.flatnonzero(decoding)
    fields.decode_seqs[num_decode:] = 0
    # Padding sequences own one padding token each (while tokens remain), then none.
    qsl = fields.query_start_loc
    qsl[0] = 0
    qsl[1 : b + 1] = ends
    qsl[b + 1 :] = np.minimum(tokens + np.arange(1, shape.num_seqs - b + 1), shape.num_tokens)
    samples = ends[np.fromiter((s.samples for s in sequences), bool, b)] - 1
    fields.sample_rows[: samples.shape[0]] = samples
    rest = shape.num_samples - samples.shape[0]
    if rest > 0:  # padding rows sample their own token row (their logits are ignored)
        rows = np.arange(tokens, tokens + rest, dtype=np.int64)
        fields.sample_rows[samples.shape[0] :] = np.minimum(rows, max(shape.num_tokens - 1, 0))


@dataclass(frozen=True, kw_only=True)
class DeviceStepBatch(StepBatch):
    """A `StepBatch` whose index tensors come from one packed device copy.

    Attributes:
        slot_mapping: ``[T]`` flat KV position per token (-1: padding).
        block_tables: ``[B, W]`` page rows per sequence (zeros past its pages).
        context_lens: ``[B]`` cached tokens once the step is done (0: padding).
        query_start_loc: ``[B + 1]`` offsets of each sequence's tokens.
        slot_idx: ``[B]`` state slot rows (-1: padding).
        has_initial_state: ``[B]`` 1 where the sequence continues from its slot.
        decode_rows, decode_slots: ``[num_decode]`` token rows and slots of the decode
            sequences (one token after cached context), so a step mixing prefill chunks
            and decodes runs the decodes' conv update in one launch. The same sequences
            also form the batch's `DecodeGroup`, for the layers that run the torch
            reference (Mamba1: one batched decode call, not one per sequence). In a
            padded step, the whole padded arrays (``[B]``, unused entries 0 and -1): the
            host does not tell a graph how many decodes it replays.
        max_query_len: longest new-token run (host int, for the prefill launch grid); in
            a padded step the step's rows, a bound that depends on its bucket alone.
        is_decode: every sequence computes one token after cached context.
        padded: the step names no sequences and is padded to a bucket (a CUDA graph's
            step, or the same pass run eagerly): kernels that skip rows leave zeros
            there, never uninitialised memory, since a padded step's rows past its
            sequences, and those of padding sequences, are read by later layers.
        mamba2_scan_plans: per chunk size, how the Mamba2 prefill scan splits this step
            (`TritonOps` fills it at the step's first Mamba2 layer, on the device, and
            every later layer reuses it).
        attention_tiles: the prefill attention's tile table of this step, keyed by its
            query block size (filled at the first attention layer, then reused).
        conv_tiles: the varlen causal conv's tile table of this step, keyed by its
            tile size (filled at the first conv layer of a prefill or mixed step, then
            reused).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_idx: torch.Tensor
    has_initial_state: torch.Tensor
    decode_rows: torch.Tensor
    decode_slots: torch.Tensor
    max_query_len: int
    is_decode: bool
    padded: bool = False
    # Filled once per step by the first layer that needs it, not part of the batch's value.
    mamba2_scan_plans: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)
    attention_tiles: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)
    conv_tiles: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)


def device_batch(
    fields: PackedStep,
    sequences: list[SequenceWork],
    block_size: int,
    is_decode: bool,
    padded: bool = False,
) -> DeviceStepBatch:
    """Wrap device slices as a batch. Per-sequence chunks (for layers without a Triton
    path) reuse the device block table rows; padding sequences get none, nor does the
    decode group (built from ``sequences``, so a padded step, which names none, has no
    group and no padding row can reach a reference state update).

    A ``padded`` step (``sequences`` empty) keeps the decode arrays at their padded
    size and bounds its query runs by its rows, so nothing in it depends on host
    values that differ between steps of one bucket."""
    if padded and sequences:
        raise ValueError("a padded step names no sequences: its layers read device arrays")
    chunks = []
    start = 0
    for i, seq in enumerate(sequences):
        n = len(seq.token_ids)
        table = fields.block_tables[i, : len(seq.page_rows)]
        chunks.append(SequenceChunk(start, n, seq.num_context, seq.slot_row, table))
        start += n
    slots = fields.slot_mapping
    if padded:
        num_decode, longest = fields.decode_rows.shape[0], fields.input_ids.shape[0]
    else:
        num_decode = sum(1 for s in sequences if len(s.token_ids) == 1 and s.num_context > 0)
        longest = max((len(s.token_ids) for s in sequences), default=1)
    decode = None
    if num_decode and not padded:
        picked = fields.decode_seqs[:num_decode]
        decode = DecodeGroup(
            token_index=fields.decode_rows[:num_decode],
            slots=fields.decode_slots[:num_decode],
            block_tables=fields.block_tables.index_select(0, picked),
            num_tokens=fields.context_lens.index_select(0, picked),
        )
    return DeviceStepBatch(
        sequences=tuple(chunks),
        decode=decode,
        positions=fields.positions,
        page_ids=torch.div(slots, block_size, rounding_mode="floor"),
        page_offsets=torch.remainder(slots, block_size),
        slot_mapping=slots,
        block_tables=fields.block_tables,
        context_lens=fields.context_lens,
        query_start_loc=fields.query_start_loc,
        slot_idx=fields.slot_idx,
        has_initial_state=fields.has_initial_state,
        decode_rows=fields.decode_rows[:num_decode],
        decode_slots=fields.decode_slots[:num_decode],
        max_query_len=longest,
        is_decode=is_decode,
        padded=padded,
    )
