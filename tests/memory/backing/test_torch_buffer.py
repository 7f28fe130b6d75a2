"""TorchBufferBacking on the CPU: the Backing contract with content checks, the two pools
growing toward each other, zero-copy migration under the manager's id rule."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from backing_helpers import TEST_SPEC, BackingDriver, pattern, small_config
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from avmp.memory.backing.base import BackingError
from avmp.memory.backing.torch_buffer import TorchBufferBacking
from avmp.memory.spec import PoolKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/memory: the contract
from backing_contract import BackingContract, manager_state_machine, unit_pattern  # noqa: E402

CPU = torch.device("cpu")


def attached(num_chunks: int = 8) -> TorchBufferBacking:
    backing = TorchBufferBacking("cpu")
    backing.attach(TEST_SPEC, small_config(num_chunks))
    return backing


def test_buffer_holds_whole_budget_and_pools_meet_in_the_middle() -> None:
    backing = attached(8)
    assert backing.buffer.numel() == 8 * 2 * 2**20
    backing.map_chunks(PoolKind.KV, [0, 1, 2])
    backing.map_chunks(PoolKind.STATE, [7, 6])
    assert backing.num_mapped_units(PoolKind.KV) == 3 * 2 * 2**20 // TEST_SPEC.page_bytes
    kv_end = backing.num_mapped_units(PoolKind.KV) * TEST_SPEC.page_bytes
    state_bytes = backing.num_mapped_units(PoolKind.STATE) * TEST_SPEC.slot_bytes
    state_start = backing.buffer.numel() - state_bytes
    assert kv_end <= 3 * 2 * 2**20 <= 6 * 2 * 2**20 <= state_start


def test_state_slot_zero_sits_at_the_top_and_units_stay_put_when_the_pool_grows() -> None:
    backing = attached(8)
    backing.map_chunks(PoolKind.STATE, [7])
    data = pattern(3, TEST_SPEC.slot_bytes, CPU)
    backing.write_unit(PoolKind.STATE, 0, data.numpy().tobytes())
    assert torch.equal(backing.buffer[-TEST_SPEC.slot_bytes :], data)
    backing.map_chunks(PoolKind.STATE, [6, 5])
    assert backing.read_unit(PoolKind.STATE, 0) == data.numpy().tobytes()


def test_unit_straddling_chunks_round_trips() -> None:
    backing = attached(4)
    backing.map_chunks(PoolKind.KV, [0, 1])
    straddler = 2 * 2**20 // TEST_SPEC.page_bytes  # starts in chunk 0, ends in chunk 1
    data = pattern(9, TEST_SPEC.page_bytes, CPU).numpy().tobytes()
    backing.write_unit(PoolKind.KV, straddler, data)
    assert backing.read_unit(PoolKind.KV, straddler) == data


def test_unmap_returns_tail_last_and_migration_tail_first_copies_nothing() -> None:
    backing = attached(6)
    backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])
    backing.map_chunks(PoolKind.STATE, [5, 4])
    boundary = backing.buffer[3 * 2 * 2**20 : 4 * 2 * 2**20].clone()
    ids = backing.unmap_chunks(PoolKind.KV, 2)
    assert ids == [2, 3]
    backing.map_chunks(PoolKind.STATE, ids[::-1])
    assert backing.mapped_chunks(PoolKind.STATE) == [5, 4, 3, 2]
    assert backing.num_migration_bytes_copied == 0
    assert torch.equal(backing.buffer[3 * 2 * 2**20 : 4 * 2 * 2**20], boundary)


def test_migration_in_any_order_keeps_chunk_bytes_by_copying() -> None:
    backing = attached(6)
    backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])
    backing.map_chunks(PoolKind.STATE, [5, 4])
    chunk = 2 * 2**20
    before = {c: backing.buffer[c * chunk : (c + 1) * chunk].clone() for c in (2, 3)}
    ids = backing.unmap_chunks(PoolKind.KV, 2)
    backing.map_chunks(PoolKind.STATE, ids)  # not tail first: chunk 2 lands at buffer chunk 3
    assert backing.num_migration_bytes_copied == 2 * 2 * chunk
    assert torch.equal(backing.buffer[3 * chunk : 4 * chunk], before[2])
    assert torch.equal(backing.buffer[2 * chunk : 3 * chunk], before[3])


def test_misuse_is_refused_and_changes_nothing() -> None:
    backing = attached(4)
    backing.map_chunks(PoolKind.KV, [0])
    with pytest.raises(BackingError, match="already mapped"):
        backing.map_chunks(PoolKind.STATE, [0])
    with pytest.raises(BackingError, match="must lie in"):
        backing.map_chunks(PoolKind.STATE, [4])
    with pytest.raises(BackingError, match="cannot unmap"):
        backing.unmap_chunks(PoolKind.KV, 2)
    with pytest.raises(BackingError, match="not mapped"):
        backing.read_unit(PoolKind.STATE, 0)
    with pytest.raises(BackingError, match="bytes"):
        backing.write_unit(PoolKind.KV, 0, b"short")
    assert backing.mapped_chunks(PoolKind.KV) == [0] and backing.mapped_chunks(PoolKind.STATE) == []


def test_copy_units_moves_a_batch_and_counts_bytes() -> None:
    backing = attached(4)
    backing.map_chunks(PoolKind.STATE, [3, 2])
    units = backing.num_mapped_units(PoolKind.STATE)
    for unit in range(units):
        data = pattern(unit, TEST_SPEC.slot_bytes, CPU).numpy().tobytes()
        backing.write_unit(PoolKind.STATE, unit, data)
    moves = [(units - 1, 0), (units - 2, 1)]
    backing.copy_units(PoolKind.STATE, moves)
    for src, dst in moves:
        want = pattern(src, TEST_SPEC.slot_bytes, CPU).numpy().tobytes()
        assert backing.read_unit(PoolKind.STATE, dst) == want
    assert backing.num_bytes_compacted == 2 * 2 * TEST_SPEC.slot_bytes
    with pytest.raises(BackingError):
        backing.copy_units(PoolKind.STATE, [(units, 0)])


def test_context_manager_closes() -> None:
    with TorchBufferBacking("cpu") as backing:
        backing.attach(TEST_SPEC, small_config(2))
    with pytest.raises(RuntimeError, match="not attached"):
        _ = backing.buffer
    backing.close()  # idempotent


def test_random_walk_keeps_every_unit() -> None:
    driver = BackingDriver(attached(6), random.Random(7))
    for step in range(300):
        if driver.random_step() or step % 10 == 0:
            driver.check()
    driver.check()
    assert driver.num_migrations > 5 and driver.num_compactions > 5
    assert driver.backing.num_migration_bytes_copied == 0


class BufferMachine(RuleBasedStateMachine):
    """Hypothesis drives map / write / free / compact / migrate; contents must survive."""

    def __init__(self) -> None:
        super().__init__()
        self.driver = BackingDriver(attached(4), random.Random(0))

    @rule(pool=st.sampled_from(list(PoolKind)), count=st.integers(1, 3))
    def grow(self, pool: PoolKind, count: int) -> None:
        self.driver.grow(pool, min(count, len(self.driver.unowned())))

    @rule(pool=st.sampled_from(list(PoolKind)), times=st.integers(1, 20))
    def write(self, pool: PoolKind, times: int) -> None:
        for _ in range(times):
            self.driver.write(pool)

    @rule(pool=st.sampled_from(list(PoolKind)), seed=st.integers(0, 2**16))
    def free(self, pool: PoolKind, seed: int) -> None:
        self.driver.rng.seed(seed)
        for _ in range(self.driver.rng.randint(1, 8)):
            self.driver.free(pool)

    @rule(pool=st.sampled_from(list(PoolKind)))
    def compact(self, pool: PoolKind) -> None:
        self.driver.compact(pool)

    @rule(pool=st.sampled_from(list(PoolKind)), count=st.integers(1, 4))
    def migrate(self, pool: PoolKind, count: int) -> None:
        self.driver.migrate(pool, count)

    @invariant()
    def contents_and_chunks_hold(self) -> None:
        self.driver.check()
        kv, state = (self.driver.backing.mapped_chunks(p) for p in PoolKind)
        assert len(set(kv) | set(state)) == len(kv) + len(state) <= self.driver.num_chunks
        assert self.driver.backing.num_migration_bytes_copied == 0


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)


def make_cpu_backing() -> TorchBufferBacking:
    return TorchBufferBacking(device="cpu")


class TestTorchBufferContract(BackingContract):
    """The manager author's backing contract, on the CPU buffer.

    One check differs by design: in this backing the state pool grows down from the top,
    so a state unit occupies the mirror image of its virtual byte interval, its bytes in
    ascending order (units stay contiguous for views; torch has no negative strides).
    A chunk's bytes still go wherever the chunk goes, but a unit straddling two chunks
    reads its pieces in the mirrored order; the only bytes this affects are those of free
    chunks a migration hands over, which no live unit holds.
    """

    make_backing = staticmethod(make_cpu_backing)

    def test_bytes_stay_with_a_migrated_chunk(self) -> None:
        mib = 1 << 20
        with self._attached() as backing:
            assert isinstance(backing, TorchBufferBacking)
            backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])
            backing.map_chunks(PoolKind.STATE, [5])
            pages = [unit_pattern(10 + index, 3 * mib // 2) for index in range(5)]
            for index, page in enumerate(pages):
                backing.write_unit(PoolKind.KV, index, page)
            assert backing.unmap_chunks(PoolKind.KV, 2) == [2, 3]
            backing.map_chunks(PoolKind.STATE, [2, 3])  # state pool: chunks 5, 2, 3
            # state slot 1 is mirrored: buffer bytes [6, 9) MiB, i.e. all of the chunk at
            # state position 2 (chunk 3: page 4 then 0.5 MiB more) then the first MiB of
            # the chunk at state position 1 (chunk 2: the last 0.5 MiB of page 2, page 3)
            slot_one = backing.read_unit(PoolKind.STATE, 1)
            assert slot_one[: 3 * mib // 2] == pages[4]
            assert slot_one[2 * mib : 2 * mib + mib // 2] == pages[2][mib:]
            assert slot_one[2 * mib + mib // 2 :] == pages[3][: mib // 2]
            assert backing.read_unit(PoolKind.KV, 0) == pages[0]
            assert backing.read_unit(PoolKind.KV, 1) == pages[1]


TestTorchBufferManagerMachine = manager_state_machine(
    make_cpu_backing, max_examples=15, step_count=30
).TestCase
