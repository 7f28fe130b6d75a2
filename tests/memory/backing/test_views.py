"""CacheFormat offsets and per-layer views over the CPU buffer backing: shapes, dtypes,
alignment, and data written through views surviving migration and compaction."""

from __future__ import annotations

import pytest
import torch
from backing_helpers import tiny_geometry

from avmp.memory.backing.torch_buffer import TorchBufferBacking
from avmp.memory.backing.unit_format import CacheFormat
from avmp.memory.backing.views import build_views
from avmp.memory.spec import CacheSpec, MemoryConfig, PoolKind
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

MIB = 1 << 20


def test_format_of_a_hybrid_is_exact_and_aligned() -> None:
    geometry = tiny_geometry()
    cache_format = CacheFormat.from_geometry(geometry, block_size=16)
    assert cache_format.padding_bytes == 0
    assert cache_format.cache_spec() == CacheSpec.from_geometry(geometry, 16)
    names = [(t.layer_index, t.name) for t in cache_format.page.tensors]
    assert names == [(1, "k"), (1, "v"), (3, "k"), (3, "v")]
    assert [(t.layer_index, t.name) for t in cache_format.slot.tensors] == [
        (0, "conv"), (0, "ssm"), (2, "conv"), (2, "ssm"),
    ]
    for unit in (cache_format.page, cache_format.slot):
        ends = [t.offset_bytes + t.num_bytes for t in unit.tensors]
        assert all(t.offset_bytes % 16 == 0 for t in unit.tensors)
        following = unit.tensors[1:]
        assert all(end <= nxt.offset_bytes for end, nxt in zip(ends, following, strict=False))
        assert ends[-1] <= unit.unit_bytes


def odd_geometry() -> ModelGeometry:
    """A conv state of 3 bf16 columns x 5 channels (30 bytes) forces alignment padding."""
    layer = RecurrentLayer(
        0, LayerKind.MAMBA2, ssm=CacheTensor("ssm", (3,), "float32"),
        conv=CacheTensor("conv", (5, 3), "bfloat16"),
    )
    return ModelGeometry(
        name="odd", family="test", num_layers=2, attention_layers=(AttentionLayer(1, 1, 8),),
        recurrent_layers=(layer,), hidden_size=8, vocab_size=8, num_params=1,
        num_active_params=1,
    )


def test_padding_is_counted_and_a_mismatched_spec_is_refused() -> None:
    geometry = odd_geometry()
    cache_format = CacheFormat.from_geometry(geometry)
    conv, ssm = cache_format.slot.tensors
    assert (conv.offset_bytes, ssm.offset_bytes) == (0, 32)  # 30-byte conv padded to 32
    assert cache_format.slot.exact_bytes == 42 and cache_format.slot.unit_bytes == 48
    backing = TorchBufferBacking()
    backing.attach(CacheSpec.from_geometry(geometry), MemoryConfig(budget_bytes=2 * MIB))
    with pytest.raises(ValueError, match="cache_spec"):
        build_views(backing, cache_format)
    natural = CacheFormat.from_geometry(geometry, alignment_bytes=1)
    assert natural.slot.unit_bytes == 44  # only element alignment: fp32 after 30 bytes -> 32


def attached_views(num_chunks: int = 4) -> tuple[TorchBufferBacking, object]:
    cache_format = CacheFormat.from_geometry(tiny_geometry())
    backing = TorchBufferBacking()
    backing.attach(cache_format.cache_spec(), MemoryConfig(budget_bytes=num_chunks * 2 * MIB))
    return backing, build_views(backing, cache_format)


def test_views_have_the_kernel_shapes_and_dtypes() -> None:
    backing, views = attached_views()
    max_pages = backing.max_units(PoolKind.KV)
    max_slots = backing.max_units(PoolKind.STATE)
    layer = views.attention[1]
    assert layer.k.shape == (max_pages, 16, 2, 8) and layer.k.dtype == torch.bfloat16
    state = views.recurrent[0]
    assert state.conv is not None and state.conv.shape == (max_slots, 24, 3)
    assert state.conv.dtype == torch.bfloat16
    assert state.ssm.shape == (max_slots, 2, 8, 4) and state.ssm.dtype == torch.float32
    assert [v.layer_index for v in views.attention_layers] == [1, 3]


def test_views_tile_each_unit_without_overlap() -> None:
    """Writing every view's row r fills exactly unit r's bytes, nothing else."""
    backing, views = attached_views()
    backing.map_chunks(PoolKind.KV, [0])
    backing.map_chunks(PoolKind.STATE, [3])
    backing.buffer.zero_()
    for layer in views.attention_layers:
        layer.k[5].fill_(1.0)
        layer.v[5].fill_(1.0)
    for rec in views.recurrent_layers:
        row = views.slot_row(2)
        rec.ssm[row].fill_(1.0)
        assert rec.conv is not None
        rec.conv[row].fill_(1.0)
    page = torch.frombuffer(bytearray(backing.read_unit(PoolKind.KV, 5)), dtype=torch.uint8)
    slot = torch.frombuffer(bytearray(backing.read_unit(PoolKind.STATE, 2)), dtype=torch.uint8)
    assert bool((page != 0).any()) and bool((slot != 0).any())
    # no byte outside page 5 and slot 2 was touched
    total = int((backing.buffer != 0).sum())
    assert total == int((page != 0).sum()) + int((slot != 0).sum())


def test_view_data_survives_migration_and_compaction() -> None:
    backing, views = attached_views(4)
    backing.map_chunks(PoolKind.KV, [0, 1])
    backing.map_chunks(PoolKind.STATE, [3, 2])
    generator = torch.Generator().manual_seed(0)
    rec = views.recurrent[2]
    slots = backing.num_mapped_units(PoolKind.STATE)
    live = slots - 1  # the last mapped slot: compaction moves it to slot 0
    ssm = torch.randn(rec.ssm.shape[1:], generator=generator)
    rec.ssm[views.slot_row(live)] = ssm
    k_page = torch.randn(views.attention[3].k.shape[1:], generator=generator).bfloat16()
    views.attention[3].k[7] = k_page
    backing.copy_units(PoolKind.STATE, [(live, 0)])
    ids = backing.unmap_chunks(PoolKind.STATE, 1)  # slot 0 stays: the tail chunk is free now
    backing.map_chunks(PoolKind.KV, ids[::-1])
    assert torch.equal(rec.ssm[views.slot_row(0)], ssm)
    assert torch.equal(views.attention[3].k[7], k_page)
    assert backing.num_migration_bytes_copied == 0
