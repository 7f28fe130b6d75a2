"""`TensorParallel`: which rank of how many this process is, and the collectives its
sharded layers call.

The default, `SINGLE`, is one rank: layers built with it are the unsharded layers
(plain ``nn.Linear`` and ``nn.Embedding``, no collective anywhere), so a model of
world size 1 runs exactly the code it ran before tensor parallelism existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from avmp.models.tensor_parallel import split_heads


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group.

    Attributes:
        rank: this process's index in the group, ``0 .. size - 1``.
        size: the number of ranks (the tensor-parallel world size).
        group: the ``torch.distributed`` process group the collectives run in; None
            is the default group (or no group at all: a model can be built and
            loaded for a rank without one, only its forward pass communicates).
    """

    rank: int = 0
    size: int = 1
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor parallel size must be at least 1, not {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a tensor parallel group of {self.size}")

    @property
    def is_single(self) -> bool:
        """Whether this is one rank alone (nothing sharded, nothing communicated)."""
        return self.size == 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; every rank gets the same bits (ring
        all-reduce, gloo and NCCL alike), so replicated computation stays in lockstep."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def split(self, num: int, what: str) -> tuple[int, int]:
        """This rank's first index and count when ``num`` units split evenly.

        Raises:
            ValueError: ``num`` is not a multiple of the size.
        """
        if num % self.size:
            raise ValueError(f"tensor parallel size {self.size} must divide {what} ({num})")
        count = num // self.size
        return self.rank * count, count

    def split_or_replicate(self, num: int, what: str) -> tuple[int, int]:
        """This rank's first index and count of units that split evenly when there are
        at least as many as ranks, and are each held by ``size / num`` ranks (the one
        unit their heads use) when there are fewer: vLLM's rule for KV heads
        (``QKVParallelLinear``) and Mamba2 groups (``MambaMixer2``), as
        `avmp.models.tensor_parallel.split_heads` states it for the plan.

        Raises:
            ValueError: neither ``num`` nor the size divides the other.
        """
        heads = split_heads(num, self.size, what)
        return heads.first(self.rank), heads.per_rank


SINGLE = TensorParallel()
