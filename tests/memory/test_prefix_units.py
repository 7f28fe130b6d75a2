"""The AVMP manager's cached units under compaction: the prefix cache's keys follow
the bytes they name, and a request that adopts them reads what was cached.

Geometry as in test_manager: one attention layer of 4 KiB per token (a 256-token page
is 1 MiB, two per 2 MiB chunk) and one recurrent layer of a 1 MiB fp32 state.
"""

from __future__ import annotations

from avmp.memory import AvmpManager
from avmp.memory.backing import HostBacking
from avmp.memory.spec import MemoryConfig, PoolKind
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

MiB = 1 << 20
KV, STATE = PoolKind.KV, PoolKind.STATE
PAGE = 256


def _manager(num_chunks: int, backing: HostBacking) -> AvmpManager:
    state = CacheTensor("ssm", (MiB // (128 * 4), 128), "float32")
    geometry = ModelGeometry(
        name="hand-built", family="test", num_layers=2,
        attention_layers=(AttentionLayer(0, 8, 128),),
        recurrent_layers=(RecurrentLayer(1, LayerKind.MAMBA2, ssm=state),),
        hidden_size=64, vocab_size=256, num_params=1, num_active_params=1,
    )  # fmt: skip
    config = MemoryConfig(budget_bytes=num_chunks * 2 * MiB, block_size=PAGE)
    return AvmpManager(geometry, config, backing)


def test_compaction_moves_a_cached_page_and_its_key_follows() -> None:
    with HostBacking() as backing:
        m = _manager(4, backing)
        m.admit(1, 4 * PAGE)  # state [0] (two slots), KV [1, 2]: pages 0-3
        m.admit(2, PAGE)  # slot 1, page 4: KV takes chunk 3, the reserve is empty
        key = m.cache_kv_unit(2, 0)
        data = bytes([0xC2]) * MiB
        backing.write_unit(KV, 4, data)
        m.free(2)  # page 4 stays: the cache holds it
        m.admit(5, PAGE)  # slot 1, page 5
        m.free(1)
        m.admit(3, PAGE)  # slot 0, page 0
        m.admit(4, PAGE)  # a third slot: KV's tail chunk holds pages 4 and 5, so compact
        assert m.stats.num_compactions == 1 and m.pool_chunks(STATE) == [0, 3]
        assert m.cached_unit(key) == 1 and backing.read_unit(KV, 1) == data
        assert m.units(5).pages == (2,)
        m.check_integrity()
        m.free(3)  # slot 0, page 0
        units = m.admit(6, 2 * PAGE, cached=[key])
        assert units is not None and units.pages == (1, 0)
        assert m.usage().kv_cached_bytes == 0  # request 6 holds it now
        m.free(6)
        m.release_cached(key)
        m.check_integrity()
        assert m.usage().num_pages_used == 2  # requests 4 and 5


def test_compaction_moves_a_checkpoint_and_its_key_follows() -> None:
    with HostBacking() as backing:
        m = _manager(3, backing)
        m.admit(1, PAGE)  # state [0]: slot 0; KV [1]: page 0
        m.admit(2, PAGE)  # slot 1, page 1
        key = m.cache_checkpoint()  # state takes the last chunk, 2: slot 2
        assert key is not None and m.cached_unit(key) == 2
        data = bytes([0xD1]) * MiB
        backing.write_unit(STATE, 2, data)
        m.free(1)  # slot 0 and page 0 free
        assert m.grow(2, 2 * PAGE) is not None  # page 0 and one more: state's tail chunk
        assert m.stats.num_compactions == 1 and m.pool_chunks(STATE) == [0]
        assert m.cached_unit(key) == 0 and backing.read_unit(STATE, 0) == data
        assert m.usage().state_cached_bytes == MiB
        m.check_integrity()


def test_an_admission_that_compacts_adopts_the_moved_page() -> None:
    """Making room for the new request's slot compacts the KV tail that holds the cached
    page it adopts: the request gets the page where it lives after the move."""
    with HostBacking() as backing:
        m = _manager(4, backing)
        m.admit(1, 4 * PAGE)  # state [0]: slots 0, 1; KV [1, 2]: pages 0-3
        m.admit(2, PAGE)  # slot 1, page 4 in chunk 3
        key = m.cache_kv_unit(2, 0)
        data = bytes([0xE4]) * MiB
        backing.write_unit(KV, 4, data)
        m.free(2)
        m.admit(5, PAGE)  # slot 1, page 5
        m.free(1)
        m.admit(3, PAGE)  # slot 0, page 0: both slots taken
        units = m.admit(6, 2 * PAGE, cached=[key])  # a slot: KV's tail chunk must go
        assert units is not None and m.stats.num_compactions == 1
        assert units.pages[0] == m.cached_unit(key) == 1
        assert backing.read_unit(KV, 1) == data
        m.check_integrity()
