"""Which part of each full tensor a rank holds, so that a checkpoint (or a full model
built on every rank) is sliced the same way the sharded layers were sized.

A sharded parameter records a `Shard`: along one dimension, the concatenation of some
index ranges of the full tensor (a fused projection such as Mamba2's ``in_proj`` is
several sections, each sliced on its own), zero-padded to the local length when the
full size does not split evenly (a vocabulary). Parameters without one are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

_SHARD_ATTRIBUTE = "tp_shard"


@dataclass(frozen=True)
class Rows:
    """Index ranges of one dimension of a full tensor, taken in order.

    Attributes:
        ranges: ``(start, stop)`` pairs of the full tensor, concatenated in this order.
        full: the full tensor's length along the dimension.
        size: the local length (at least the ranges' total; the rest is zero padding).
    """

    ranges: tuple[tuple[int, int], ...]
    full: int
    size: int

    def __post_init__(self) -> None:
        taken = sum(stop - start for start, stop in self.ranges)
        if taken > self.size:
            raise ValueError(f"rows take {taken} indices into a local length of {self.size}")
        if any(not 0 <= start <= stop <= self.full for start, stop in self.ranges):
            raise ValueError(f"row ranges {self.ranges} fall outside a length of {self.full}")

    @classmethod
    def units(cls, first: int, count: int, width: int, num_units: int) -> Rows:
        """``count`` consecutive units of ``width`` rows from unit ``first`` (heads of a
        projection, groups of a state) out of ``num_units``."""
        return cls(((first * width, (first + count) * width),), num_units * width, count * width)

    @classmethod
    def sections(cls, parts: Sequence[Rows]) -> Rows:
        """Sections of a fused tensor, each sliced on its own, laid end to end (in the
        full tensor and locally)."""
        ranges: list[tuple[int, int]] = []
        offset = 0
        for part in parts:
            if part.size != sum(stop - start for start, stop in part.ranges):
                raise ValueError("a padded section cannot be fused with others")
            ranges.extend((offset + start, offset + stop) for start, stop in part.ranges)
            offset += part.full
        return cls(tuple(ranges), offset, sum(part.size for part in parts))

    def index(self) -> torch.Tensor:
        """The full tensor's indices in local order (padding left out)."""
        return torch.cat([torch.arange(start, stop) for start, stop in self.ranges])


class Sliceable(Protocol):
    """A full tensor or a lazy safetensors slice: indexed with a tuple of slices."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shard:
    """The part of a full tensor that one rank's parameter holds: `Rows` along ``dim``."""

    dim: int
    rows: Rows

    def take(self, full: Sliceable) -> torch.Tensor:
        """This rank's part of ``full``, read range by range (a lazy slice reads only
        those bytes from the file)."""
        lead = (slice(None),) * self.dim
        parts = [full[(*lead, slice(start, stop))] for start, stop in self.rows.ranges]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        missing = self.rows.size - out.shape[self.dim]
        if missing:
            pad_shape = list(out.shape)
            pad_shape[self.dim] = missing
            out = torch.cat([out, out.new_zeros(pad_shape)], dim=self.dim)
        return out


def set_shard(tensor: torch.Tensor, dim: int, rows: Rows) -> None:
    """Record which part of the full tensor ``tensor`` (a parameter) holds on this
    rank, as vLLM's loaders record their weight attributes."""
    setattr(tensor, _SHARD_ATTRIBUTE, Shard(dim, rows))


def shard_of(tensor: torch.Tensor) -> Shard | None:
    """The part of the full tensor that ``tensor`` holds, or None if it is replicated."""
    shard: Shard | None = getattr(tensor, _SHARD_ATTRIBUTE, None)
    return shard


def model_shards(model: nn.Module) -> dict[str, Shard]:
    """The sharded parameters of a model by state-dict name (tied names included)."""
    return {
        name: shard
        for name, param in model.named_parameters(remove_duplicate=False)
        if (shard := shard_of(param)) is not None
    }


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy each rank's part of a full state dict into a sharded model (the full model
    built identically on every rank, e.g. from one seed, then sliced).

    Raises:
        ValueError: a name or shape of ``full`` does not match the model.
    """
    shards = model_shards(model)
    local = model.state_dict()
    missing = sorted(set(local) - set(full))
    if missing:
        raise ValueError(f"the full state lacks {', '.join(missing[:5])}")
    for name, target in local.items():
        shard = shards.get(name)
        value = full[name] if shard is None else shard.take(full[name])
        if value.shape != target.shape:
            raise ValueError(
                f"{name}: the rank's part is {tuple(value.shape)}, the model's "
                f"{tuple(target.shape)}"
            )
        target.copy_(value)
