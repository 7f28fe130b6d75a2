"""The migration policies: the "streak" history's rules by hand, a KV streak that
"streak" serves with fewer migrations than "eager", and random call sequences on which
both policies answer every call alike (no OOM event that "eager" would not have), pass
`check_integrity` after every call, and decide the same way when replayed."""

from __future__ import annotations

from typing import Any

import pytest
from backing_contract import make_geometry
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory import AvmpManager
from avmp.memory.migration import MigrationHistory
from avmp.memory.spec import MemoryConfig, PoolKind
from avmp.models.geometry import ModelGeometry

MiB = 1 << 20
KV, STATE = PoolKind.KV, PoolKind.STATE

GEOMETRIES = [
    # 8 KiB pages (256 per chunk), 1.2 MiB slots (straddling chunks)
    make_geometry(2, 2, 64, [(4096, 64, "bfloat16", True), (1024, 16, "float32", True)]),
    # 96 KiB pages, 4.3 MiB slots (three chunks per slot)
    make_geometry(3, 8, 128, [(8192, 128, "float32", True)]),
    # 1 KiB pages, 64 KiB slots: many units per chunk both ways
    make_geometry(1, 1, 128, [(256, 64, "float32", False)]),
]


def test_history_extra_grows_with_the_streak_and_lapses() -> None:
    history = MigrationHistory(window_calls=100)
    assert history.extra_chunks(KV, 0) == 0  # no streak yet
    history.record(KV, 2, now=10)
    assert history.extra_chunks(KV, 110) == 2
    assert history.extra_chunks(KV, 111) == 0  # past the window
    history.record(KV, 4, now=50)
    assert history.extra_chunks(KV, 60) == 6
    history.record(KV, 1, now=200)  # the streak had lapsed: it starts again
    assert history.extra_chunks(KV, 201) == 1


def test_history_gives_no_extra_from_a_donor_that_just_received() -> None:
    history = MigrationHistory(window_calls=100)
    history.record(KV, 8, now=10)
    history.record(STATE, 3, now=20)
    assert history.extra_chunks(KV, 30) == 0  # state needed chunks 10 calls ago
    assert history.extra_chunks(STATE, 30) == 0  # KV needed chunks too
    assert history.extra_chunks(STATE, 111) == 3  # KV's need is out of the window


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown migration_policy 'lazy'; known: streak, eager"):
        MemoryConfig(budget_bytes=4 * MiB, migration_policy="lazy")


def _kv_streak(policy: str) -> AvmpManager:
    """One request's pages fill the KV pool chunk by chunk while the state pool's tail,
    left free by finished requests, donates (1 MiB pages and slots: two per chunk)."""
    geometry = make_geometry(1, 8, 128, [(2048, 128, "float32", False)])
    config = MemoryConfig(budget_bytes=16 * 2 * MiB, block_size=256, migration_policy=policy)
    manager = AvmpManager(geometry, config)
    for request_id in range(16):  # 8 chunks per pool: the reserve is empty
        assert manager.admit(request_id, 1) is not None
    for request_id in range(1, 16):
        manager.free(request_id)
    for _ in range(29):  # 256 tokens = one page a call, up to all 15 chunks but the slot's
        assert manager.grow(0, 256) is not None
        manager.check_integrity()
    return manager


def test_a_kv_streak_takes_fewer_migrations_than_eager() -> None:
    eager, streak = _kv_streak("eager"), _kv_streak("streak")
    assert eager.stats.num_migrations == 7  # one chunk (two pages) at a time
    # the streak's extra: what it received so far, at most half of the spare free tail
    # (7 donatable chunks, then 6, 4, 2, 1 left): 1, 1 + 1, 1 + 1, 1, 1
    assert [e.num_chunks for e in streak.events if e.kind == "migration"] == [1, 2, 2, 1, 1]
    assert streak.stats.num_compactions == eager.stats.num_compactions == 0
    # the state pool keeps its live slot's chunk either way
    assert len(streak.pool_chunks(STATE)) >= 1
    assert streak.units(0) == eager.units(0)


Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(st.sampled_from(["admit", "admit", "grow", "grow", "free"]),
              st.integers(0, 10**6), st.integers(1, 2000)),
    min_size=1, max_size=120,
)


def _drive(manager: AvmpManager, sequence: list[Op]) -> list[Any]:
    """Apply ``sequence`` (op, pick, tokens), checking integrity after every call; return
    each call's answer (None for an OOM event) and the pools' chunks after it."""
    live: list[int] = []
    answers: list[Any] = []
    next_id = 0
    for op, pick, tokens in sequence:
        if op == "admit" or not live:
            if not manager.fits_alone(tokens):
                continue
            units = manager.admit(next_id, tokens)
            answers.append(units is not None)
            if units is not None:
                live.append(next_id)
            next_id += 1
        elif op == "grow":
            target = live[pick % len(live)]
            if manager.fits_alone(manager.num_tokens(target) + tokens):
                answers.append(manager.grow(target, tokens) is not None)
        else:
            manager.free(live.pop(pick % len(live)))
        manager.check_integrity()
        answers.append((manager.pool_chunks(KV), manager.pool_chunks(STATE)))
    return answers


def _manager(geometry: ModelGeometry, num_chunks: int, policy: str) -> AvmpManager:
    config = MemoryConfig(budget_bytes=num_chunks * 2 * MiB, migration_policy=policy)
    return AvmpManager(geometry, config)


@settings(max_examples=80, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), num_chunks=st.integers(4, 24), sequence=ops)
def test_streak_answers_every_call_as_eager_does(
    geometry: ModelGeometry, num_chunks: int, sequence: list[Op]
) -> None:
    eager = _manager(geometry, num_chunks, "eager")
    streak = _manager(geometry, num_chunks, "streak")
    eager_answers = _drive(eager, sequence)
    streak_answers = _drive(streak, sequence)
    fits = [a for a in eager_answers if isinstance(a, bool)]
    assert fits == [a for a in streak_answers if isinstance(a, bool)]
    assert streak.stats.num_oom_events == eager.stats.num_oom_events
    assert streak.usage().num_pages_used == eager.usage().num_pages_used
    # the same sequence gives the same decisions: chunks, events, units
    again = _manager(geometry, num_chunks, "streak")
    assert _drive(again, sequence) == streak_answers
    assert again.events == streak.events
    assert {r: again.units(r) for r in again.request_ids} == {
        r: streak.units(r) for r in streak.request_ids
    }
