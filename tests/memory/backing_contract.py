"""Reusable checks that a `Backing` does what the AVMP manager needs, for any backing.

Two pieces, both parametrized by a factory that returns a fresh, unattached backing:

- `BackingContract`: direct checks of the `Backing` interface (map, unmap, read and
  write across chunk boundaries, bytes staying with a migrated chunk, batched copies).
- `manager_state_machine(factory)`: a Hypothesis state machine that drives an
  `AvmpManager` over that backing with random admit / grow / free calls, random
  geometries and small budgets (so migrations and compactions happen), writing a unique
  pattern into every unit it is given and checking after every step that the manager's
  invariants hold and every live unit still reads back its pattern.

Reusing them for another backing (e.g. a torch buffer backing), in a test module::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the folder of this file,
    # needed only when the test module lives elsewhere (e.g. tests/memory/backing/)
    from backing_contract import BackingContract, manager_state_machine

    def make() -> TorchBufferBacking:
        return TorchBufferBacking(device="cpu")

    class TestTorchBufferContract(BackingContract):
        make_backing = staticmethod(make)

    TestTorchBufferMachine = manager_state_machine(make, max_examples=20).TestCase

A backing may also expose ``mapped_chunks(pool) -> list[int]``; when it does, the machine
checks it against the manager's `AvmpManager.pool_chunks` after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from avmp.memory.backing.base import Backing, BackingError
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import (
    CacheSpec,
    DoubleFreeError,
    MemoryConfig,
    PoolKind,
    RequestTooLargeError,
    UnknownRequestError,
)
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

MiB = 1 << 20
BackingFactory = Callable[[], Backing]


def unit_pattern(tag: int, num_bytes: int) -> bytes:
    """``num_bytes`` bytes that only the unit tagged ``tag`` holds."""
    word = tag.to_bytes(8, "little")
    return (word * (num_bytes // 8 + 1))[:num_bytes]


def make_geometry(
    num_attention: int, kv_heads: int, head_dim: int, recurrent: list[tuple[int, int, str, bool]]
) -> ModelGeometry:
    """A hand-built hybrid: ``recurrent`` lists (channels, d_state, ssm dtype, has conv)."""
    attention = tuple(AttentionLayer(i, kv_heads, head_dim) for i in range(num_attention))
    layers = tuple(
        RecurrentLayer(
            layer_index=100 + i,
            kind=LayerKind.MAMBA2,
            ssm=CacheTensor("ssm", (channels, d_state), dtype),
            conv=CacheTensor("conv", (channels, 3), "bfloat16") if has_conv else None,
        )
        for i, (channels, d_state, dtype, has_conv) in enumerate(recurrent)
    )
    return ModelGeometry(
        name="random-hybrid", family="test", num_layers=max(num_attention, len(layers)),
        attention_layers=attention, recurrent_layers=layers, hidden_size=64,
        vocab_size=256, num_params=1, num_active_params=1,
    )


recurrent_layer = st.tuples(
    st.sampled_from([8, 512, 2048, 8192]),
    st.sampled_from([1, 16, 128]),
    st.sampled_from(["bfloat16", "float32"]),
    st.booleans(),
)


@st.composite
def geometries(draw: st.DrawFn) -> ModelGeometry:
    """Random geometries: pages of 4 KiB to 768 KiB with the block sizes of
    `memory_configs` (hundreds of units per chunk down to a few), slots from a few bytes
    to several chunks, and the two degenerate cases (no attention, no state)."""
    shape = draw(st.sampled_from(["hybrid"] * 8 + ["no attention", "no state"]))
    num_attention = 0 if shape == "no attention" else draw(st.integers(1, 3))
    num_recurrent = 0 if shape == "no state" else draw(st.integers(1, 3))
    recurrent = draw(st.lists(recurrent_layer, min_size=num_recurrent, max_size=num_recurrent))
    return make_geometry(
        num_attention, draw(st.sampled_from([1, 2, 8])), draw(st.sampled_from([64, 128])),
        recurrent,
    )




def _snapshot(manager: AvmpManager) -> tuple[Any, ...]:
    """Everything a failed call must leave as it was."""
    return (
        {rid: manager.units(rid) for rid in manager.request_ids},
        manager.pool_chunks(PoolKind.KV),
        manager.pool_chunks(PoolKind.STATE),
        manager.reserve_chunks(),
        manager.num_free_units(PoolKind.KV),
        manager.num_free_units(PoolKind.STATE),
        manager.placement_epoch,
        len(manager.events),
        manager.usage(),
    )


class ManagerMachine(RuleBasedStateMachine):
    """Random admit / grow / free against an `AvmpManager` over a backing (see module
    docstring). ``backing_factory`` is set by `manager_state_machine`."""

    backing_factory: BackingFactory | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, list[int]] = {}  # request -> [slot tag, page tags...]
        self.tokens: dict[int, int] = {}
        self.freed: list[int] = []
        self.next_id = 0
        self.next_tag = 1
        self.events_checked = 0

    @initialize(
        geometry=geometries(),
        num_spare_chunks=st.integers(0, 8),
        block_size=st.sampled_from([16, 64]),
        batch=st.integers(0, 2),
    )
    def setup(
        self, geometry: ModelGeometry, num_spare_chunks: int, block_size: int, batch: int
    ) -> None:
        # a small budget: one slot's chunks, one chunk for pages, and a few spare
        slot_chunks = -(-geometry.state_bytes_per_request // (2 * MiB))
        config = MemoryConfig(budget_bytes=(slot_chunks + 1 + num_spare_chunks) * 2 * MiB,
                              block_size=block_size, migration_batch_chunks=batch)
        factory = type(self).backing_factory
        self.backing = factory() if factory is not None else None
        self.manager = AvmpManager(geometry, config, self.backing)
        self.spec = CacheSpec.from_geometry(geometry, config.block_size)
        # token counts are fractions of the tokens the whole budget holds, so a few
        # requests fill it and the pools must trade chunks
        self.budget_tokens = max(1, config.budget_bytes // max(1, self.spec.kv_bytes_per_token))

    def teardown(self) -> None:
        if getattr(self, "backing", None) is not None:
            self.backing.close()

    # -- rules ------------------------------------------------------------------------

    @rule(fraction=st.sampled_from([0.0, 0.005, 0.03, 0.1, 0.3, 0.7]))
    def admit(self, fraction: float) -> None:
        num_tokens = max(1, int(self.budget_tokens * fraction))
        request_id = self.next_id
        self.next_id += 1
        if not self.manager.fits_alone(num_tokens):
            with pytest.raises(RequestTooLargeError):
                self.manager.admit(request_id, num_tokens)
            return
        before = _snapshot(self.manager)
        blocks = self.manager.admit(request_id, num_tokens)
        if blocks is None:
            assert _snapshot(self.manager) == before, "a failed admit changed something"
            return
        assert len(blocks.pages) == self.spec.num_pages_for(num_tokens)
        self.tokens[request_id] = num_tokens
        self.tags[request_id] = [self._write(PoolKind.STATE, blocks.slot)]
        self.tags[request_id] += [self._write(PoolKind.KV, page) for page in blocks.pages]

    @rule(fraction=st.sampled_from([0.0, 0.01, 0.05]))
    def fill(self, fraction: float) -> None:
        """Admit equal requests until memory is short: empties the reserve, so later
        calls of the other shape must migrate (and compact, once frees fragment it)."""
        for _ in range(48):
            self.admit(fraction)
            if self.next_id - 1 not in self.tokens:
                return

    @rule(data=st.data(), fraction=st.sampled_from([0.0, 0.005, 0.03, 0.2]))
    def grow(self, data: st.DataObject, fraction: float) -> None:
        if not self.tokens:
            return
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        num_new = max(1, int(self.budget_tokens * fraction))
        if not self.manager.fits_alone(self.tokens[request_id] + num_new):
            with pytest.raises(RequestTooLargeError):
                self.manager.grow(request_id, num_new)
            return
        before = _snapshot(self.manager)
        pages = self.manager.grow(request_id, num_new)
        if pages is None:
            assert _snapshot(self.manager) == before, "a failed grow changed something"
            return
        self.tokens[request_id] += num_new
        assert len(pages) == (self.spec.num_pages_for(self.tokens[request_id])
                              - len(self.tags[request_id]) + 1)
        self.tags[request_id] += [self._write(PoolKind.KV, page) for page in pages]

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        if not self.tokens:
            return
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(request_id)
        del self.tokens[request_id], self.tags[request_id]
        self.freed.append(request_id)

    @rule()
    def free_every_other(self) -> None:
        """Free the first, third, ... live request: holes below live units, so a donor's
        free capacity is no longer at its tail and migration must compact."""
        for request_id in sorted(self.tokens)[::2]:
            self.manager.free(request_id)
            del self.tokens[request_id], self.tags[request_id]
            self.freed.append(request_id)

    @rule(data=st.data())
    def misuse_freed(self, data: st.DataObject) -> None:
        if not self.freed:
            return
        request_id = data.draw(st.sampled_from(self.freed))
        before = _snapshot(self.manager)
        with pytest.raises(DoubleFreeError):
            self.manager.free(request_id)
        with pytest.raises(UnknownRequestError):
            self.manager.grow(request_id, 1)
        assert _snapshot(self.manager) == before

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def manager_is_consistent(self) -> None:
        if not hasattr(self, "manager"):
            return
        manager = self.manager
        manager.check_integrity()
        owned = (manager.reserve_chunks() + manager.pool_chunks(PoolKind.KV)
                 + manager.pool_chunks(PoolKind.STATE))
        assert sorted(owned) == list(range(manager.config.num_chunks)), "chunks not conserved"
        usage = manager.usage()
        assert usage.kv_used_bytes <= usage.kv_capacity_bytes
        assert usage.state_used_bytes <= usage.state_capacity_bytes
        assert usage.kv_capacity_bytes + usage.state_capacity_bytes <= usage.budget_bytes
        assert manager.request_ids == sorted(self.tokens)  # ids increase in admission order
        for request_id, num_tokens in self.tokens.items():
            assert manager.num_tokens(request_id) == num_tokens
        self._check_events()
        mapped = getattr(self.backing, "mapped_chunks", None)
        if mapped is not None:
            for pool in PoolKind:
                assert mapped(pool) == manager.pool_chunks(pool), f"{pool.value} mapping"

    def _check_events(self) -> None:
        manager = self.manager
        events = manager.events
        kinds = [event.kind for event in events]
        assert kinds.count("migration") == manager.stats.num_migrations
        assert kinds.count("compaction") == manager.stats.num_compactions
        new_events = events[self.events_checked:]
        for i, event in enumerate(new_events):
            if event.kind == "compaction":  # a compaction only ever empties a donor's tail
                follower = new_events[i + 1]
                assert follower.kind == "migration" and follower.pool is event.pool.other
            if event.kind == "migration":  # migration only once the reserve is empty
                assert not manager.reserve_chunks()
        for kind in sorted({event.kind for event in new_events}):
            hypothesis.event(kind)  # shown by pytest --hypothesis-show-statistics
        if new_events:
            self._check_all_bytes()
        self.events_checked = len(events)

    # -- bytes ------------------------------------------------------------------------

    def _write(self, pool: PoolKind, index: int) -> int:
        """Write a fresh pattern into a unit just handed out; return its tag (0: no unit)."""
        unit_bytes = self.spec.unit_bytes(pool)
        if self.backing is None or unit_bytes == 0 or index < 0:
            return 0
        tag = self.next_tag
        self.next_tag += 1
        self.backing.write_unit(pool, index, unit_pattern(tag, unit_bytes))
        return tag

    def _check_all_bytes(self) -> None:
        """Every live unit still holds the pattern written when it was handed out."""
        if self.backing is None:
            return
        for request_id, tags in self.tags.items():
            blocks = self.manager.units(request_id)
            units = [(PoolKind.STATE, blocks.slot)] + [(PoolKind.KV, p) for p in blocks.pages]
            for (pool, index), tag in zip(units, tags, strict=True):
                if tag:
                    expected = unit_pattern(tag, self.spec.unit_bytes(pool))
                    assert self.backing.read_unit(pool, index) == expected, (
                        f"request {request_id}: {pool.value} unit {index} lost its bytes"
                    )


def manager_state_machine(
    factory: BackingFactory | None, *, max_examples: int = 60, step_count: int = 50
) -> type[ManagerMachine]:
    """A `ManagerMachine` subclass over backings from ``factory`` (None: bookkeeping only);
    collect it in pytest through its ``.TestCase`` attribute."""
    machine = type("ManagerMachineOver", (ManagerMachine,), {"backing_factory": factory})
    machine.TestCase.settings = settings(
        max_examples=max_examples,
        stateful_step_count=step_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return machine


class BackingContract:
    """Direct checks of a backing; subclass as ``Test...`` and set ``make_backing``.

    The spec used has a 3 MiB slot (straddling 2 MiB chunks) and 1.5 MiB pages.
    """

    make_backing: Callable[[], Backing]

    def _attached(self, num_chunks: int = 6) -> Backing:
        backing = self.make_backing()
        spec = CacheSpec(page_bytes=3 * MiB // 2, slot_bytes=3 * MiB, block_size=16,
                         kv_bytes_per_token=3 * MiB // 32)
        backing.attach(spec, MemoryConfig(budget_bytes=num_chunks * 2 * MiB))
        return backing

    def test_write_then_read_across_chunk_boundaries(self) -> None:
        with self._attached() as backing:
            backing.map_chunks(PoolKind.KV, [4, 1, 3])  # 6 MiB: 4 pages of 1.5 MiB
            for index in range(4):
                backing.write_unit(PoolKind.KV, index, unit_pattern(index + 1, 3 * MiB // 2))
            for index in range(4):
                assert backing.read_unit(PoolKind.KV, index) == unit_pattern(index + 1,
                                                                             3 * MiB // 2)

    def test_bytes_stay_with_a_migrated_chunk(self) -> None:
        with self._attached() as backing:
            backing.map_chunks(PoolKind.KV, [0, 1, 2, 3])  # 8 MiB: 5 pages, page 4 on chunk 3
            backing.map_chunks(PoolKind.STATE, [5])
            pages = [unit_pattern(10 + index, 3 * MiB // 2) for index in range(5)]
            for index, page in enumerate(pages):
                backing.write_unit(PoolKind.KV, index, page)
            assert backing.unmap_chunks(PoolKind.KV, 2) == [2, 3]
            backing.map_chunks(PoolKind.STATE, [2, 3])  # state range: chunks 5, 2, 3
            # KV chunk 2 held the tail of page 2 then all of page 3; chunk 3 began with page 4.
            # State slot 1 (3..6 MiB) is the second half of chunk 2, then chunk 3.
            slot_one = backing.read_unit(PoolKind.STATE, 1)
            assert slot_one[:MiB] == pages[3][MiB // 2:]
            assert slot_one[MiB:MiB + 3 * MiB // 2] == pages[4]
            assert backing.read_unit(PoolKind.KV, 0) == pages[0]
            assert backing.read_unit(PoolKind.KV, 1) == pages[1]

    def test_copy_units_is_one_batch(self) -> None:
        with self._attached() as backing:
            backing.map_chunks(PoolKind.STATE, [0, 1, 2, 3, 4, 5])  # 12 MiB: 4 slots
            for index in range(4):
                backing.write_unit(PoolKind.STATE, index, unit_pattern(20 + index, 3 * MiB))
            backing.copy_units(PoolKind.STATE, [(3, 0), (2, 1)])
            assert backing.read_unit(PoolKind.STATE, 0) == unit_pattern(23, 3 * MiB)
            assert backing.read_unit(PoolKind.STATE, 1) == unit_pattern(22, 3 * MiB)
            assert backing.read_unit(PoolKind.STATE, 3) == unit_pattern(23, 3 * MiB)

    def test_misuse_is_refused(self) -> None:
        with self._attached() as backing:
            backing.map_chunks(PoolKind.KV, [0])
            with pytest.raises(BackingError):
                backing.map_chunks(PoolKind.STATE, [0])  # already mapped
            assert backing.unmap_chunks(PoolKind.STATE, 0) == []
            with pytest.raises(BackingError):
                backing.unmap_chunks(PoolKind.STATE, 1)
