"""Per-layer torch views over the pools: what kernels read and write.

Attention layer ``l``: ``k`` and ``v`` as ``[max_pages, block_size, kv_heads, head_dim]``,
strided over the page-major KV pool (a page holds every attention layer's K and V for its
tokens, see `CacheFormat`). Recurrent layer ``l``: ``conv`` and ``ssm`` as
``[max_slots, *shape]`` in their own dtypes (bf16 conv beside fp32 SSM, say), strided over
the slot-major state pool. Views span a pool's whole range (its capacity if it owned every
chunk) and never change: migration maps chunks behind them and compaction moves units
inside them, so a view built once stays valid for the backing's life.

Index views with table rows, not unit indices: ``views.page_rows(pages)`` and
``views.slot_rows(slots)`` translate (identity except the one-buffer backing's state pool,
whose slot 0 sits at the top). Only rows of mapped units may be handed to kernels: on
CUDA VMM an unmapped address is an illegal access that kills the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avmp.memory.backing.device import TensorBacking
from avmp.memory.backing.unit_format import CacheFormat, TensorPlacement
from avmp.memory.spec import PoolKind

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class AttentionViews:
    """One attention layer's K and V, ``[max_pages, block_size, kv_heads, head_dim]``."""

    layer_index: int
    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class RecurrentViews:
    """One recurrent layer's state: ``conv`` (None for lightning attention) and ``ssm``
    (None for a short convolution), each ``[max_slots, *shape]``."""

    layer_index: int
    ssm: torch.Tensor | None
    conv: torch.Tensor | None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _typed_view(
    pool: torch.Tensor, unit_bytes: int, num_units: int, tensor: TensorPlacement
) -> torch.Tensor:
    """``[num_units, *tensor.shape]`` in the tensor's dtype, strided over ``pool`` bytes."""
    dtype = TORCH_DTYPES[tensor.dtype]
    size = tensor.element_bytes
    if unit_bytes % size or tensor.offset_bytes % size or pool.data_ptr() % size:
        raise ValueError(f"{tensor.name} of layer {tensor.layer_index} is not {size}-byte aligned")
    typed = pool[: pool.numel() - pool.numel() % size].view(dtype)  # [pool_bytes / size]
    return torch.as_strided(
        typed,
        size=(num_units, *tensor.shape),
        stride=(unit_bytes // size, *_contiguous_strides(tensor.shape)),
        storage_offset=typed.storage_offset() + tensor.offset_bytes // size,
    )


class BackingViews:
    """Every layer's views over one backing, built once from a `CacheFormat`."""

    def __init__(self, backing: TensorBacking, layout: CacheFormat) -> None:
        layout.check_spec(backing.spec)
        self.backing = backing
        self.layout = layout
        # in the geometry's layer order (a shared attention block may appear twice)
        self.attention_layers: list[AttentionViews] = []
        self.recurrent_layers: list[RecurrentViews] = []
        for index, tensors in self._views(PoolKind.KV):
            self.attention_layers.append(AttentionViews(index, tensors["k"], tensors["v"]))
        for index, tensors in self._views(PoolKind.STATE):
            state = RecurrentViews(index, tensors.get("ssm"), tensors.get("conv"))
            self.recurrent_layers.append(state)
        self.attention = {views.layer_index: views for views in self.attention_layers}
        self.recurrent = {views.layer_index: views for views in self.recurrent_layers}

    def _views(self, pool: PoolKind) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """(layer index, {name: view}) per layer of ``pool``, in geometry order."""
        unit = self.layout.unit(pool)
        num_units = self.backing.max_units(pool)
        if not unit.tensors or num_units == 0:
            return []
        raw = self.backing.pool_bytes(pool)  # [num_units * unit_bytes] uint8
        by_position: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        for tensor in unit.tensors:
            view = _typed_view(raw, unit.unit_bytes, num_units, tensor)
            entry = by_position.setdefault(tensor.layer_position, (tensor.layer_index, {}))
            entry[1][tensor.name] = view
        return [by_position[position] for position in sorted(by_position)]

    def page_rows(self, pages: torch.Tensor) -> torch.Tensor:
        """View rows of page indices (the KV pool is never reversed: identity)."""
        return self.backing.rows_of(PoolKind.KV, pages)

    def slot_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """View rows of slot indices."""
        return self.backing.rows_of(PoolKind.STATE, slots)

    def slot_row(self, slot: int) -> int:
        return self.backing.row_of(PoolKind.STATE, slot)


def build_views(backing: TensorBacking, layout: CacheFormat) -> BackingViews:
    """Per-layer views over an attached backing (cheap: strided metadata, no copy)."""
    return BackingViews(backing, layout)
