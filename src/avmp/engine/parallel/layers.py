"""Tensor-parallel building blocks: column- and row-parallel linears, the
vocabulary-parallel embedding and LM head, and norms whose groups span ranks.

Each factory returns the plain torch module when the group is one rank, so a model of
world size 1 holds exactly the modules (and runs exactly the ops) it held before.
Under several ranks, a column-parallel linear is an ``nn.Linear`` holding some output
rows (no communication); a row-parallel one holds some input columns and returns its
partial sum, which it all-reduces itself or leaves to the block that adds several
partial sums before one all-reduce (Falcon-H1's parallel attention and Mamba, an MoE
with a shared expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avmp.engine.parallel.group import TensorParallel
from avmp.engine.parallel.shards import Rows, set_shard
from avmp.models.tensor_parallel import vocab_per_rank


def column_linear(in_features: int, rows: Rows, bias: bool, tp: TensorParallel) -> nn.Linear:
    """A linear whose output rows are ``rows`` of the full one (all of them on one rank)."""
    if tp.is_single:
        return nn.Linear(in_features, rows.full, bias=bias)
    linear = nn.Linear(in_features, rows.size, bias=bias)
    set_shard(linear.weight, 0, rows)
    if linear.bias is not None:
        set_shard(linear.bias, 0, rows)
    return linear


def row_linear(
    columns: Rows, out_features: int, bias: bool, tp: TensorParallel, reduce: bool = True
) -> nn.Linear:
    """A linear that reads ``columns`` of the full one's inputs: its output is this
    rank's partial sum, all-reduced here when ``reduce`` (else by the caller)."""
    if tp.is_single:
        return nn.Linear(columns.full, out_features, bias=bias)
    return RowParallelLinear(columns, out_features, bias, tp, reduce)


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` over some input columns. The bias is added by rank 0 alone, so the
    sum over ranks holds it once."""

    def __init__(
        self, columns: Rows, out_features: int, bias: bool, tp: TensorParallel, reduce: bool
    ) -> None:
        super().__init__(columns.size, out_features, bias=bias)
        set_shard(self.weight, 1, columns)
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(out) if self.reduce else out


def vocab_rows(vocab_size: int, tp: TensorParallel) -> Rows:
    """This rank's vocabulary rows: the vocabulary padded to a multiple of 64 per rank
    (`avmp.models.tensor_parallel.vocab_per_rank`, vLLM's rule), the padding zero rows
    at the end of the last ranks."""
    per_rank = vocab_per_rank(vocab_size, tp.size)
    start = min(tp.rank * per_rank, vocab_size)
    return Rows(((start, min(start + per_rank, vocab_size)),), vocab_size, per_rank)


def embedding(vocab_size: int, hidden_size: int, tp: TensorParallel) -> nn.Embedding:
    """The token embedding, split by vocabulary rows across ranks."""
    if tp.is_single:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


class VocabParallelEmbedding(nn.Embedding):
    """Rows of the embedding table: each rank looks up the ids it holds (zeros for the
    others) and one all-reduce assembles every token's row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        rows = vocab_rows(vocab_size, tp)
        super().__init__(rows.size, hidden_size)
        set_shard(self.weight, 0, rows)
        ((self.first_id, self.stop_id),) = rows.ranges
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.first_id) | (input_ids >= self.stop_id)
        local = (input_ids - self.first_id).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(out)


def lm_head(hidden_size: int, vocab_size: int, tp: TensorParallel) -> nn.Linear:
    """The output projection to the vocabulary, split by vocabulary rows."""
    if tp.is_single:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size, tp)


class ParallelLMHead(nn.Linear):
    """Rows of the LM head (the embedding's rows when tied): each rank computes its
    vocabulary's logits and an all-gather assembles them, padding dropped."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        rows = vocab_rows(vocab_size, tp)
        super().__init__(hidden_size, rows.size, bias=False)
        set_shard(self.weight, 0, rows)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [N, vocab / size]
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]


class NormSpan:
    """Where a rank's channels sit in a norm whose groups are wider than them: the
    rank holds part of group ``group`` of ``num_groups``, each ``group_size`` wide, and
    the other parts are on other ranks (Mamba2's gated norm with fewer groups than
    ranks, MiniMax's norm over every lightning head)."""

    def __init__(self, tp: TensorParallel, group: int, num_groups: int, group_size: int) -> None:
        self.tp, self.group, self.num_groups, self.group_size = tp, group, num_groups, group_size

    @classmethod
    def of(
        cls, tp: TensorParallel, first_channel: int, num_channels: int, group_size: int
    ) -> NormSpan | None:
        """The span of a rank holding channels ``first_channel ..`` of ``num_channels``
        under norm groups of ``group_size``; None when it holds whole groups (the norm
        is local).

        Raises:
            ValueError: a group neither fits whole in a rank's channels nor in whole
                ranks.
        """
        local = num_channels // tp.size
        if local % group_size == 0:
            return None
        if group_size % local:
            raise ValueError(
                f"tensor parallel size {tp.size}: norm groups of {group_size} channels "
                f"neither fit in nor span whole ranks of {local} channels"
            )
        return cls(tp, first_channel // group_size, num_channels // group_size, group_size)

    def mean_square(self, h: torch.Tensor) -> torch.Tensor:
        """``[T, 1]`` mean of squares over the whole group of ``h [T, local]``: the
        local sums of every rank, added by one all-reduce of a ``[T, groups]`` table
        (each rank filling its group's column) so ranks add only within a group."""
        sums = h.pow(2).sum(-1, keepdim=True)
        if self.num_groups == 1:
            return self.tp.all_reduce(sums) / self.group_size
        table = h.new_zeros(h.shape[0], self.num_groups)
        table[:, self.group] = sums[:, 0]
        self.tp.all_reduce(table)
        return table[:, self.group : self.group + 1] / self.group_size

    def rms_norm(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        """``h`` in float32 over the RMS of its whole group."""
        h = h.float()
        return h * torch.rsqrt(self.mean_square(h) + eps)
