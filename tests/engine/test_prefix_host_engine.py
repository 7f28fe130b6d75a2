"""The prefix cache's host level in the engine (checkpoints evicted to the host tier,
restored on a hit: outputs token-identical, bytes exact), and the cache's rules priced
at the engine's own device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_prefix_engine import HEAVY_GRANITE

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.prefix_cache import HostCheckpointCopies
from avmp.memory.spec import PoolKind
from avmp.sched.prefix import PrefixCacheConfig, ReuseLedger, prefill_flops
from avmp.sched.swap import PreemptionCosts

# priced as a slow device: on the tiny model a hit must save more than a checkpoint's
# copy over the host link costs, or the host level keeps nothing
HOST_LEVEL = PrefixCacheConfig("avmp", host_level=True, device_flops_per_s=1e9)


def _config(**options: Any) -> EngineConfig:
    defaults: dict[str, Any] = dict(
        memory_bytes=4 * MiB, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
        admission="greedy", check_integrity=True, preemption="swap",
    )  # fmt: skip
    return EngineConfig(**{**defaults, **options})


def _conversations(engine: Engine, num_turns: int = 3) -> list[list[list[int]]]:
    """Six conversations run turn by turn; each turn's outputs."""
    prompts = random_prompts([40, 70, 20, 90, 33, 50], seed=3)
    outputs_by_turn = []
    for turn in range(num_turns):
        outputs = engine.generate(prompts, max_tokens=12)
        outputs_by_turn.append([output.token_ids for output in outputs])
        users = random_prompts([15, 13, 18, 9, 20, 14], seed=10 + turn)
        prompts = [p + o.token_ids + u for p, o, u in zip(prompts, outputs, users, strict=True)]
    return outputs_by_turn


@pytest.mark.parametrize("overlap", [True, False])
def test_hits_restored_from_the_host_tier_are_token_identical(
    overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """At 4 MiB the device level evicts checkpoints that the next turns need; the host
    level keeps them in the swapper's arena and copies them back, and the outputs stay
    those of the run without any cache."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY_GRANITE)
    off = _conversations(Engine(checkpoint.path, _config(overlap=overlap)))
    engine = Engine(checkpoint.path, _config(prefix_cache=HOST_LEVEL, overlap=overlap))
    assert _conversations(engine) == off
    prefix = engine.scheduler.prefix
    assert prefix is not None and prefix.tree.host is not None
    host = prefix.tree.host.stats
    assert host.num_kept > 0 and host.num_restored > 0
    assert engine.totals.prefix.num_evicted_checkpoints > 0
    assert engine.swapper is not None
    assert engine.swapper.num_bytes_in >= host.num_bytes_in  # its copies went through it


def test_a_host_checkpoint_round_trips_byte_exact(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A slot's bytes copied to a host extent and back into another slot are the same
    bytes, through the swapper's arena."""
    checkpoint = tiny_checkpoint("jamba", eos_token_id=None)
    engine = Engine(checkpoint.path, _config(memory_bytes=8 * MiB, prefix_cache=HOST_LEVEL))
    swapper = engine.swapper
    assert swapper is not None
    allocator, backing = engine.allocator, engine.backing
    src, dst = (allocator.admit(900 + i, 1) for i in range(2))
    assert src is not None and dst is not None
    table = backing.unit_table(PoolKind.STATE)  # [units, slot_unit_bytes] uint8
    source = table[backing.row_of(PoolKind.STATE, src.slot)]
    source.copy_(torch.randint(0, 256, source.shape, dtype=torch.uint8))
    slot_bytes = source.numel()
    extent = engine.scheduler.host_tier.reserve_cached(0, slot_bytes)
    assert extent is not None
    copies = HostCheckpointCopies(swapper)
    copies.to_host(src.slot, extent)
    assert torch.equal(swapper.host_bytes(extent.offset, slot_bytes), source)
    copies.from_host(extent, dst.slot)
    assert torch.equal(table[backing.row_of(PoolKind.STATE, dst.slot)], source)


def test_the_rules_are_priced_at_the_engine_s_device(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A policy name is priced at the prefill speed and host link the engine measured
    (here: given), so a slower device pays for a move that a faster one does not; a
    config given whole keeps its rates."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None)
    configs = {}
    for name, costs in (
        ("fast", PreemptionCosts(1e-9, 5e10)),
        ("slow", PreemptionCosts(1e-6, 1e9)),
    ):
        options = dict(prefix_cache="avmp", preemption="auto", preemption_costs=costs)
        engine = Engine(checkpoint.path, _config(memory_bytes=8 * MiB, **options))
        cache = engine.prefix_cache
        assert cache is not None
        chunk = engine.config.max_num_batched_tokens
        flops = prefill_flops(engine.geometry, chunk) / (chunk * costs.prefill_s_per_token)
        assert cache.device_flops_per_s == flops
        assert cache.host_bytes_per_s == costs.host_bytes_per_s
        assert cache.compaction_bytes_per_s > 0  # measured on this device
        configs[name] = cache
    saved = prefill_flops(engine.geometry, 64)
    move_s = (saved / configs["fast"].device_flops_per_s * saved
              / configs["slow"].device_flops_per_s) ** 0.5  # fmt: skip
    decisions = {}
    for name, cache in configs.items():
        ledger = ReuseLedger(cache)
        ledger.admitted(saved)
        decisions[name] = ledger.pays_for(move_s)
    assert decisions == {"fast": False, "slow": True}
    given = Engine(checkpoint.path, _config(memory_bytes=8 * MiB, prefix_cache=HOST_LEVEL))
    assert given.prefix_cache is HOST_LEVEL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap", [False, True])
def test_host_level_on_cuda_is_token_identical(
    overlap: bool, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """On the GPU: Triton kernels, decode graphs, a pinned arena and the swapper's copy
    stream; checkpoints copied out at eviction and back at a hit are ordered between the
    steps that write and read them, and the outputs stay those without a cache."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY_GRANITE)
    options: dict[str, Any] = dict(device="cuda", kernels="triton", overlap=overlap,
                                   cuda_graphs=True)  # fmt: skip
    off = _conversations(Engine(checkpoint.path, _config(**options)))
    engine = Engine(checkpoint.path, _config(prefix_cache=HOST_LEVEL, **options))
    assert _conversations(engine) == off
    prefix = engine.scheduler.prefix
    assert prefix is not None and prefix.tree.host is not None
    assert prefix.tree.host.stats.num_restored > 0
    assert engine.swapper is not None and engine.swapper.pinned


def test_a_host_level_without_a_host_tier_is_refused() -> None:
    for options in ({"preemption": "recompute"}, {"host_tier_bytes": 0, "preemption": "auto"}):
        with pytest.raises(ValueError, match="host level keeps checkpoints in the host tier"):
            EngineConfig(prefix_cache=HOST_LEVEL, **options)  # type: ignore[arg-type]


def test_the_host_level_asked_by_name_is_priced_here_and_counted(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """``prefix_host_level`` with a policy name (what ``--prefix-host-level`` passes):
    the config resolved for this device keeps ``host_level``, hits come back from the
    host tier token-identical, and `PrefixCounts` adds up what the level did, per call
    and over the engine's life."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY_GRANITE)
    slow = PreemptionCosts(prefill_s_per_token=1e-5, host_bytes_per_s=1e9)
    off = _conversations(Engine(checkpoint.path, _config()))
    engine = Engine(checkpoint.path, _config(prefix_cache="avmp", prefix_host_level=True,
                                             preemption_costs=slow))  # fmt: skip
    cache = engine.prefix_cache
    assert cache is not None and cache.host_level and cache.host_bytes_per_s == 1e9
    calls = []
    prompts = random_prompts([40, 70, 20, 90, 33, 50], seed=3)
    for turn in range(3):  # as _conversations, keeping each call's counts
        outputs = engine.generate(prompts, max_tokens=12)
        calls.append(engine.stats.prefix)
        assert [o.token_ids for o in outputs] == off[turn]
        users = random_prompts([15, 13, 18, 9, 20, 14], seed=10 + turn)
        prompts = [p + o.token_ids + u for p, o, u in zip(prompts, outputs, users, strict=True)]
    prefix = engine.scheduler.prefix
    assert prefix is not None and prefix.tree.host is not None
    host, totals = prefix.tree.host.stats, engine.totals.prefix
    assert host.num_kept > 0 and host.num_restored > 0
    slot_bytes = engine.allocator.cache_format().slot.unit_bytes
    assert (totals.num_host_stored, totals.num_host_hits, totals.num_host_evicted) == (
        host.num_kept,
        host.num_restored,
        host.num_dropped,
    )  # the warm-up's are not counted, and this engine had none
    assert totals.num_host_hit_tokens == host.num_hit_tokens
    assert totals.host_bytes_out == host.num_kept * slot_bytes == host.num_bytes_out
    assert totals.host_bytes_in == host.num_restored * slot_bytes
    assert totals.num_host_checkpoints == len(prefix.tree.host.nodes)
    assert totals.host_checkpoint_bytes == totals.num_host_checkpoints * slot_bytes
    assert sum(c.num_host_hits for c in calls) == totals.num_host_hits
    assert sum(c.num_host_stored for c in calls) == totals.num_host_stored
    assert calls[-1].num_host_checkpoints == totals.num_host_checkpoints  # held: as now


def test_the_host_level_flag_needs_a_named_cache_and_a_host_tier() -> None:
    with pytest.raises(ValueError, match="needs a prefix cache named by policy"):
        EngineConfig(prefix_host_level=True)
    with pytest.raises(ValueError, match="needs a prefix cache named by policy"):
        EngineConfig(prefix_cache="off", prefix_host_level=True)
    with pytest.raises(ValueError, match="PrefixCacheConfig says host_level itself"):
        EngineConfig(prefix_cache=HOST_LEVEL, prefix_host_level=True)
    for options in ({"preemption": "recompute"}, {"host_tier_bytes": 0, "preemption": "auto"}):
        with pytest.raises(ValueError, match="host level keeps checkpoints in the host tier"):
            EngineConfig(prefix_cache="avmp", prefix_host_level=True,
                         **options)  # type: ignore[arg-type]  # fmt: skip
    assert EngineConfig(prefix_cache="avmp", prefix_host_level=True).prefix_host_level
