"""Random admit / grow / free sequences against the AVMP manager: the Hypothesis state
machine of `backing_contract` over a host backing and over no backing, plus seeded
replays that check the sequences reach migration and compaction and that the same
sequence gives the same decisions."""

from __future__ import annotations

import random
from typing import Any

from backing_contract import make_geometry, manager_state_machine

from avmp.memory.backing.host import HostBacking
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import MemoryConfig, PoolKind

MiB = 1 << 20

TestHostBackedMachine = manager_state_machine(HostBacking, max_examples=150).TestCase
TestBookkeepingMachine = manager_state_machine(None, max_examples=150).TestCase


GEOMETRIES = {
    # 8 KiB pages (256 per chunk), 1.2 MiB slots (straddling chunks)
    "small-units": make_geometry(
        2, 2, 64, [(4096, 64, "bfloat16", True), (1024, 16, "float32", True)]
    ),
    # 96 KiB pages, 4.3 MiB slots (three chunks per slot)
    "large-slots": make_geometry(3, 8, 128, [(8192, 128, "float32", True)]),
}


def replay(
    geometry_name: str, seed: int, backing: HostBacking | None
) -> tuple[AvmpManager, list[Any]]:
    """Drive a manager with a seeded random sequence; return it and its decision log."""
    rng = random.Random(seed)
    manager = AvmpManager(GEOMETRIES[geometry_name],
                          MemoryConfig(budget_bytes=10 * 2 * MiB, migration_batch_chunks=seed % 2),
                          backing)
    log: list[Any] = []
    live: list[int] = []
    for request_id in range(400):
        choice = rng.random()
        if choice < 0.45 or not live:
            num_tokens = rng.choice([1, 16, 100, 400, 1500])
            if manager.fits_alone(num_tokens):
                blocks = manager.admit(request_id, num_tokens)
                log.append(("admit", request_id, blocks))
                if blocks is not None:
                    live.append(request_id)
        elif choice < 0.75:
            target = live[rng.randrange(len(live))]
            num_new = rng.choice([1, 16, 300])
            if manager.fits_alone(manager.num_tokens(target) + num_new):
                log.append(("grow", target, manager.grow(target, num_new)))
        else:
            target = live.pop(rng.randrange(len(live)))
            manager.free(target)
            log.append(("free", target))
        manager.check_integrity()
        log.append((manager.pool_chunks(PoolKind.KV), manager.pool_chunks(PoolKind.STATE),
                    manager.placement_epoch))
    log.append(list(manager.events))
    log.append({rid: manager.units(rid) for rid in manager.request_ids})
    return manager, log


def test_seeded_sequences_reach_migration_and_compaction() -> None:
    """The random mix is not vacuous: across seeds it migrates both ways and compacts."""
    migrated_to = {"kv": 0, "state": 0}
    num_compactions = 0
    for name in GEOMETRIES:
        for seed in range(4):
            manager, _ = replay(name, seed, None)
            for pool, count in manager.stats.chunks_migrated_to.items():
                migrated_to[pool] += count
            num_compactions += manager.stats.num_compactions
    assert migrated_to["kv"] > 0 and migrated_to["state"] > 0
    assert num_compactions > 0


def test_same_sequence_gives_same_decisions() -> None:
    for name in GEOMETRIES:
        for seed in range(3):
            _, first = replay(name, seed, None)
            _, second = replay(name, seed, None)
            assert first == second


def test_a_backing_does_not_change_decisions() -> None:
    for name in GEOMETRIES:
        _, bookkeeping = replay(name, 1, None)
        with HostBacking() as backing:
            _, backed = replay(name, 1, backing)
        assert backed == bookkeeping
