"""GPU tests of CudaVmmBacking (and the buffer backing on CUDA): the backing contract,
views surviving migration and compaction, 10,000 random steps with content checks,
memory returned on close, injected cuMemCreate failures, budgets over free memory.

Skipped without CUDA or without cuda.bindings (cuda-python).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver")

from backing_helpers import (  # noqa: E402
    TEST_SPEC,
    BackingDriver,
    ManagerDriver,
    gpu_geometry,
    pattern,
    small_config,
)

from avmp.kernels.triton.compact import (  # noqa: E402
    copy_rows_torch,
    copy_rows_triton,
    warm_up,
)
from avmp.memory.backing.base import BackingError  # noqa: E402
from avmp.memory.backing.cuda_vmm import CudaVmmBacking  # noqa: E402
from avmp.memory.backing.torch_buffer import TorchBufferBacking  # noqa: E402
from avmp.memory.backing.unit_format import CacheFormat  # noqa: E402
from avmp.memory.backing.views import build_views  # noqa: E402
from avmp.memory.manager import AvmpManager  # noqa: E402
from avmp.memory.spec import MemoryConfig, PoolKind  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/memory: the contract
from backing_contract import BackingContract, manager_state_machine  # noqa: E402

pytestmark = pytest.mark.gpu
MIB = 1 << 20
CUDA = torch.device("cuda", 0)


def make_vmm() -> CudaVmmBacking:
    return CudaVmmBacking(device=0)


def vmm_attached(num_chunks: int = 8) -> CudaVmmBacking:
    backing = make_vmm()
    backing.attach(TEST_SPEC, small_config(num_chunks))
    return backing


class TestVmmContract(BackingContract):
    """The manager author's contract, literally: VMM ranges are true virtual ranges."""

    make_backing = staticmethod(make_vmm)


TestVmmManagerMachine = manager_state_machine(make_vmm, max_examples=12, step_count=30).TestCase


def test_migration_moves_handles_not_bytes() -> None:
    with vmm_attached(6) as backing:
        backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])
        backing.map_chunks(PoolKind.STATE, [5, 4])
        kv = backing.pool_bytes(PoolKind.KV)
        tail = pattern(11, 2 * 2 * MIB, CUDA)
        kv[2 * 2 * MIB : 4 * 2 * MIB] = tail
        created = backing.num_chunks_created
        ids = backing.unmap_chunks(PoolKind.KV, 2)
        backing.map_chunks(PoolKind.STATE, ids)
        state = backing.pool_bytes(PoolKind.STATE)
        assert torch.equal(state[2 * 2 * MIB : 4 * 2 * MIB], tail)  # same bytes, new address
        assert backing.num_chunks_created == created  # no new physical memory


def busy_device(seconds: float = 0.2) -> None:
    """Queue a kernel that keeps the device busy for about ``seconds`` (its spin loop's
    cycles per second measured first)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 10_000_000 / (start.elapsed_time(end) / 1e3)
    torch.cuda._sleep(int(seconds * cycles_per_s))


def test_unmap_does_not_wait_for_the_device_and_the_recipient_reads_the_queued_writes() -> None:
    with vmm_attached(6) as backing:
        backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])
        kv = backing.pool_bytes(PoolKind.KV)
        torch.cuda.synchronize()
        busy_device(0.3)
        tail = pattern(12, 2 * 2 * MIB, CUDA)
        kv[2 * 2 * MIB : 4 * 2 * MIB] = tail  # queued behind the busy kernel
        start = time.perf_counter()
        ids = backing.unmap_chunks(PoolKind.KV, 2)
        backing.map_chunks(PoolKind.STATE, ids)  # the same chunks at a second address
        waited = time.perf_counter() - start
        assert waited < 0.1, f"the host waited {waited:.3f} s for the device"
        assert backing.num_deferred_unmaps == 2  # the KV addresses are still mapped
        state = backing.pool_bytes(PoolKind.STATE)
        torch.cuda.synchronize()
        backing.map_chunks(PoolKind.KV, [4])  # any later map or unmap reaps what completed
        assert backing.num_deferred_unmaps == 0
        assert torch.equal(state[: 2 * 2 * MIB], tail)  # written before the move, read after


def test_a_pool_that_shrinks_and_grows_back_before_the_device_catches_up() -> None:
    with vmm_attached(6) as backing:
        backing.map_chunks(PoolKind.KV, [0, 1, 2])
        kv = backing.pool_bytes(PoolKind.KV)
        torch.cuda.synchronize()
        busy_device(0.2)
        ids = backing.unmap_chunks(PoolKind.KV, 1)
        assert backing.num_deferred_unmaps == 1
        backing.map_chunks(PoolKind.KV, [5])  # the same address: waits, unmaps, maps
        assert backing.num_deferred_unmaps == 0
        data = pattern(13, 2 * MIB, CUDA)
        kv[2 * 2 * MIB : 3 * 2 * MIB] = data
        torch.cuda.synchronize()
        assert torch.equal(kv[2 * 2 * MIB : 3 * 2 * MIB], data)
        backing.map_chunks(PoolKind.STATE, ids)
        assert backing.num_chunks_created == 4


def test_views_survive_migration_and_compaction() -> None:
    geometry = gpu_geometry()
    cache_format = CacheFormat.from_geometry(geometry)
    with make_vmm() as backing:
        backing.attach(cache_format.cache_spec(), MemoryConfig(budget_bytes=8 * 2 * MIB))
        views = build_views(backing, cache_format)
        backing.map_chunks(PoolKind.KV, [0, 1, 2])
        backing.map_chunks(PoolKind.STATE, [7, 6, 5])
        slots = backing.num_mapped_units(PoolKind.STATE)
        rec = views.recurrent[2]
        ssm = torch.randn(rec.ssm.shape[1:], device=CUDA)
        conv = torch.randn(rec.conv.shape[1:], device=CUDA).bfloat16()
        rec.ssm[slots - 1] = ssm
        rec.conv[slots - 1] = conv
        k = torch.randn(views.attention[1].k.shape[1:], device=CUDA).bfloat16()
        views.attention[1].k[17] = k
        backing.copy_units(PoolKind.STATE, [(slots - 1, 0)])  # empties the state tail chunk
        ids = backing.unmap_chunks(PoolKind.STATE, 1)
        backing.map_chunks(PoolKind.KV, ids)
        assert torch.equal(rec.ssm[0], ssm) and torch.equal(rec.conv[0], conv)
        assert torch.equal(views.attention[1].k[17], k)
        v = torch.randn_like(views.attention[3].v[0])
        last_page = backing.num_mapped_units(PoolKind.KV) - 1  # on the migrated chunk
        views.attention[3].v[last_page] = v
        assert torch.equal(views.attention[3].v[last_page], v)


def test_triton_compaction_matches_torch() -> None:
    generator = torch.Generator(device=CUDA).manual_seed(0)
    shape = (512, 40_000)
    table = torch.randint(0, 256, shape, dtype=torch.uint8, device=CUDA, generator=generator)
    reference = table.clone()
    perm = torch.randperm(512, device=CUDA, generator=generator)
    src, dst = perm[:200].contiguous(), perm[200:400].contiguous()
    copy_rows_triton(table, src, dst)
    copy_rows_torch(reference, src, dst)
    torch.cuda.synchronize()
    assert torch.equal(table, reference)


def test_warm_up_compiles_the_copy_before_the_first_compaction() -> None:
    """After warm_up for a row size, a copy of rows of that size launches without a
    compilation (well under the tenth of a second that compiling costs) and is exact."""
    import time

    row_bytes = 4096 * 3 + 64
    warm_up(CUDA, [row_bytes, 0])
    table = torch.randint(0, 255, (64, row_bytes), dtype=torch.uint8, device=CUDA)
    reference = table.clone()
    src = torch.arange(0, 8, device=CUDA)
    dst = torch.arange(32, 40, device=CUDA)
    torch.cuda.synchronize()
    start = time.perf_counter()
    copy_rows_triton(table, src, dst)
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 0.1
    copy_rows_torch(reference, src, dst)
    assert torch.equal(table, reference)


@pytest.mark.parametrize("kind", ["vmm", "buffer"])
def test_random_walk_10000_steps(kind: str) -> None:
    backing: Any = make_vmm() if kind == "vmm" else TorchBufferBacking(CUDA)
    backing.attach(TEST_SPEC, small_config(12))
    driver = BackingDriver(backing, random.Random(2024))
    for step in range(10_000):
        if driver.random_step() or step % 100 == 0:
            driver.check()
    driver.check()
    assert driver.num_migrations > 50 and driver.num_compactions > 50
    backing.close()


def test_manager_random_10000_steps_over_vmm() -> None:
    with make_vmm() as backing:
        manager = AvmpManager(gpu_geometry(), MemoryConfig(budget_bytes=24 * 2 * MIB), backing)
        driver = ManagerDriver(manager, backing, random.Random(7), 1500, 300)
        seen = (0, 0)
        for step in range(10_000):
            driver.step()
            now = (manager.placement_epoch, manager.stats.num_migrations)
            if now != seen or step % 200 == 0:
                driver.check()
                seen = now
        driver.check()
        assert manager.stats.num_migrations > 50 and manager.stats.num_compactions > 10


def test_close_returns_device_memory_and_100_cycles_leak_nothing() -> None:
    probe = make_vmm()
    start, _ = probe.memory_info()
    for cycle in range(100):
        with vmm_attached(8) as backing:
            backing.map_chunks(PoolKind.KV, [0, 1, 2, 3, 4])
            backing.map_chunks(PoolKind.STATE, [7, 6, 5])
            backing.write_unit(PoolKind.STATE, 0, bytes(TEST_SPEC.slot_bytes))
            if cycle == 0:
                held, _ = backing.memory_info()
                assert start - held >= 8 * 2 * MIB
        if cycle == 0:
            after_one, _ = probe.memory_info()
            assert abs(after_one - start) <= 2 * MIB
    end, _ = probe.memory_info()
    assert abs(end - start) <= 2 * MIB, f"{(start - end) / MIB:.1f} MiB not returned"


def failing_after(backing: CudaVmmBacking, successes: int) -> None:
    """Make cuMemCreate fail (as the driver would, out of memory) after ``successes``."""
    real = backing._create_chunk
    calls = {"n": 0}

    def create() -> int:
        calls["n"] += 1
        if calls["n"] > successes:
            raise BackingError("cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (injected)")
        return real()

    backing._create_chunk = create  # type: ignore[method-assign]


def test_injected_create_failure_maps_nothing_and_frees_what_it_made() -> None:
    with vmm_attached(8) as backing:
        backing.map_chunks(PoolKind.KV, [0, 1])
        before, _ = backing.memory_info()
        failing_after(backing, 2)
        with pytest.raises(BackingError, match="cuMemCreate"):
            backing.map_chunks(PoolKind.KV, [2, 3, 4])
        assert backing.mapped_chunks(PoolKind.KV) == [0, 1] and backing.num_handles == 2
        after, _ = backing.memory_info()
        assert abs(after - before) <= 2 * MIB
        del backing._create_chunk  # the real method again
        backing.map_chunks(PoolKind.KV, [2, 3, 4])
        data = pattern(5, TEST_SPEC.page_bytes, CUDA).cpu().numpy().tobytes()
        last = backing.num_mapped_units(PoolKind.KV) - 1
        backing.write_unit(PoolKind.KV, last, data)
        assert backing.read_unit(PoolKind.KV, last) == data


def test_injected_create_failure_leaves_the_manager_usable() -> None:
    with make_vmm() as backing:
        geometry = gpu_geometry()
        manager = AvmpManager(geometry, MemoryConfig(budget_bytes=16 * 2 * MIB), backing)
        driver = ManagerDriver(manager, backing, random.Random(1))
        driver.tags[0] = 1
        assert manager.admit(0, 160) is not None  # 10 pages: one KV chunk, one state chunk
        driver._fill(0)
        failing_after(backing, 0)
        chunks = (manager.pool_chunks(PoolKind.KV), manager.pool_chunks(PoolKind.STATE))
        with pytest.raises(BackingError, match="cuMemCreate"):
            manager.grow(0, 1600)  # 100 more pages: 6 fresh chunks from the reserve
        assert (manager.pool_chunks(PoolKind.KV), manager.pool_chunks(PoolKind.STATE)) == chunks
        assert backing.mapped_chunks(PoolKind.KV) == chunks[0]
        assert manager.num_tokens(0) == 160
        driver.check()
        del backing._create_chunk
        added = manager.grow(0, 1600)
        assert added is not None and len(added) == 100
        driver._fill(0, added)
        driver.check()


def test_budget_over_free_memory_is_refused_up_front() -> None:
    backing = make_vmm()
    free, _ = backing.memory_info()
    config = MemoryConfig(budget_bytes=free + 1024 * MIB)
    with pytest.raises(BackingError, match="exceeds"):
        backing.attach(TEST_SPEC, config)
    assert backing._reservation == 0
    backing.close()


def test_driver_errors_name_the_call_and_the_error() -> None:
    backing = vmm_attached(2)
    prop = backing._allocation_prop()
    prop.location.id = 4096  # no such device
    with pytest.raises(BackingError, match=r"cuMemCreate failed: CUDA_ERROR_\w+"):
        backing._call("cuMemCreate", 2 * MIB, prop, 0)
    backing.close()
