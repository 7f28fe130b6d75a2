"""Where each layer's tensors sit inside a page and inside a slot: one format that every
device backing and every per-layer view shares, so kernels and the allocator agree on bytes.

A page holds ``block_size`` tokens of K and V for every attention layer, layer after layer
(``K_l`` then ``V_l``, each ``[block_size, kv_heads, head_dim]``). A slot holds every
recurrent layer's conv state then SSM state, each in its own dtype. Every tensor starts at
an offset aligned to ``max(alignment_bytes, element size)`` (16 bytes by default, the
width of one vectorized load) and the unit size is rounded up to that alignment, so the
same offsets hold in every unit. Real models need no padding (their tensors are multiples
of 16 bytes); `padding_bytes` says how much a geometry needs.

No torch here: the allocator side may size its units from this too.
"""

from __future__ import annotations

from dataclasses import dataclass

from avmp.memory.spec import CacheSpec, PoolKind
from avmp.models.geometry import ModelGeometry, dtype_bytes
from avmp.units import round_up

DEFAULT_ALIGNMENT_BYTES = 16


@dataclass(frozen=True)
class TensorPlacement:
    """One tensor inside a unit: which layer (its index in the model and its position in
    the geometry's tuple of layers of that pool), what (``k``/``v``/``conv``/``ssm``), its
    per-unit shape and byte offset."""

    layer_index: int
    layer_position: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset_bytes: int

    @property
    def element_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def num_bytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.element_bytes


@dataclass(frozen=True)
class UnitFormat:
    """The tensors of one unit kind (page or slot), in address order, and its padded size."""

    tensors: tuple[TensorPlacement, ...]
    unit_bytes: int
    exact_bytes: int

    @property
    def padding_bytes(self) -> int:
        return self.unit_bytes - self.exact_bytes


_Entry = tuple[int, int, str, tuple[int, ...], str]


def _place(entries: list[_Entry], alignment: int) -> UnitFormat:
    """Lay entries out in order, each at the next offset aligned for it."""
    placed: list[TensorPlacement] = []
    offset = exact = 0
    widest = alignment
    for layer_index, position, name, shape, dtype in entries:
        align = max(alignment, dtype_bytes(dtype))
        widest = max(widest, align)
        offset = round_up(offset, align)
        tensor = TensorPlacement(layer_index, position, name, shape, dtype, offset)
        placed.append(tensor)
        offset += tensor.num_bytes
        exact += tensor.num_bytes
    unit_bytes = round_up(offset, widest) if placed else 0
    return UnitFormat(tuple(placed), unit_bytes, exact)


@dataclass(frozen=True)
class CacheFormat:
    """Byte format of a page (KV pool) and of a slot (state pool) for one model.

    Attributes:
        block_size: tokens per page.
        alignment_bytes: minimum alignment of every tensor inside a unit.
        page: attention layers' K and V, layer after layer.
        slot: recurrent layers' conv then SSM state, layer after layer.
    """

    block_size: int
    alignment_bytes: int
    page: UnitFormat
    slot: UnitFormat

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.alignment_bytes <= 0 or self.alignment_bytes & (self.alignment_bytes - 1):
            raise ValueError(f"alignment_bytes must be a power of two, got {self.alignment_bytes}")

    @classmethod
    def from_geometry(
        cls,
        geometry: ModelGeometry,
        block_size: int = 16,
        alignment_bytes: int = DEFAULT_ALIGNMENT_BYTES,
    ) -> CacheFormat:
        """Lay out one model's page and slot."""
        page_entries: list[_Entry] = []
        for position, attention in enumerate(geometry.attention_layers):
            for name, tensor in zip(("k", "v"), attention.tensors, strict=True):
                shape = (block_size, *tensor.shape)
                page_entries.append((attention.layer_index, position, name, shape, tensor.dtype))
        slot_entries: list[_Entry] = []
        for position, recurrent in enumerate(geometry.recurrent_layers):
            named = [("conv", recurrent.conv), ("ssm", recurrent.ssm)]
            for name, state in named:
                if state is not None:
                    entry = (recurrent.layer_index, position, name, state.shape, state.dtype)
                    slot_entries.append(entry)
        return cls(
            block_size=block_size,
            alignment_bytes=alignment_bytes,
            page=_place(page_entries, alignment_bytes),
            slot=_place(slot_entries, alignment_bytes),
        )

    def unit(self, pool: PoolKind) -> UnitFormat:
        return self.page if pool is PoolKind.KV else self.slot

    @property
    def padding_bytes(self) -> int:
        """Bytes added to one page plus one slot by alignment (0 for real models)."""
        return self.page.padding_bytes + self.slot.padding_bytes

    def cache_spec(self) -> CacheSpec:
        """The CacheSpec whose unit sizes match this format (padding included)."""
        return CacheSpec(
            page_bytes=self.page.unit_bytes,
            slot_bytes=self.slot.unit_bytes,
            block_size=self.block_size,
            kv_bytes_per_token=self.page.exact_bytes // self.block_size,
        )

    def check_spec(self, spec: CacheSpec) -> None:
        """Raise ValueError unless ``spec``'s units hold this format exactly.

        Views stride over units of the spec's size, so the spec must use the format's
        (possibly padded) sizes.
        """
        for pool in PoolKind:
            have, need = spec.unit_bytes(pool), self.unit(pool).unit_bytes
            if have != need:
                raise ValueError(
                    f"{pool.value} unit is {have} bytes but the format needs {need} "
                    f"({self.unit(pool).padding_bytes} bytes of alignment padding); "
                    "build the CacheSpec with CacheFormat.cache_spec()"
                )
