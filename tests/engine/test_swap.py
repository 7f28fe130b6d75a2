"""The engine's host tier: copies byte for byte on every layout, and greedy tokens that
stay identical when preempted requests are swapped out and resumed."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts
from test_memory_pressure import HEAVY, run

from avmp.engine.engine import Engine, EngineConfig, resolve_host_tier_bytes
from avmp.engine.host_tier import HostSwapper, measure_copy_bandwidth
from avmp.memory.host_tier import HostTier
from avmp.memory.spec import PoolKind, RequestUnits
from avmp.sched.swap import PreemptionCosts, PreemptionMode

PRESSURE_LENGTHS = [4] * 8 + [120] * 4 + [4] * 8
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def unit_bytes(engine: Engine, units: RequestUnits, num_pages: int) -> list[torch.Tensor]:
    """Copies of a request's slot and first ``num_pages`` pages, as the pools hold them."""
    backing = engine.backing
    slot = backing.unit_table(PoolKind.STATE)[backing.row_of(PoolKind.STATE, units.slot)]
    pages = backing.unit_table(PoolKind.KV)[list(units.pages[:num_pages])]
    return [slot.clone(), pages.clone()]


def fill_random(engine: Engine, units: RequestUnits, seed: int) -> None:
    """Random bytes in every unit of ``units``."""
    generator = torch.Generator().manual_seed(seed)
    for pool, indices in ((PoolKind.STATE, [units.slot]), (PoolKind.KV, list(units.pages))):
        table = engine.backing.unit_table(pool)
        for index in indices:
            row = engine.backing.row_of(pool, index)
            random = torch.randint(
                0, 256, (table.shape[1],), dtype=torch.uint8, generator=generator
            )
            table[row] = random.to(table.device)


def round_trip(engine: Engine) -> None:
    """Fill a request's units with random bytes, swap them out, overwrite them, swap
    them into a placement that shares no unit with the old one, and compare."""
    allocator, swapper = engine.allocator, engine.swapper
    assert isinstance(swapper, HostSwapper)
    tier = HostTier(swapper.capacity_bytes)
    block = engine.config.block_size
    victim = allocator.admit(100, 5 * block - 3)  # 5 pages, the last one partly used
    assert victim is not None and len(victim.pages) >= 5
    fill_random(engine, victim, seed=1)
    saved = unit_bytes(engine, victim, len(victim.pages))
    num_bytes = swapper.slot_unit_bytes + len(victim.pages) * swapper.page_unit_bytes
    extent = tier.reserve(100, num_bytes)
    assert extent is not None
    swapper.swap_out(100, victim, extent)
    fill_random(engine, victim, seed=2)  # overwritten
    allocator.free(100)
    holder = allocator.admit(101, len(victim.pages) * block)  # takes the freed units
    assert holder is not None
    resumed = allocator.admit(100, (len(victim.pages) + 2) * block)  # room to grow
    assert resumed is not None
    assert resumed.slot != victim.slot and not set(resumed.pages) & set(victim.pages)
    fill_random(engine, resumed, seed=3)
    swapper.swap_in(100, resumed, extent)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    restored = unit_bytes(engine, resumed, len(victim.pages))
    assert torch.equal(restored[0], saved[0]) and torch.equal(restored[1], saved[1])
    assert swapper.num_bytes_out == swapper.num_bytes_in == num_bytes


@pytest.mark.parametrize("allocator", ["avmp", "unified"])
def test_swap_round_trip_is_byte_exact(
    allocator: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """On the one-buffer backing (state slot 0 at the top) and the unified layout's
    shared buffer (slots padded to a run of blocks)."""
    checkpoint = tiny_checkpoint("granitemoehybrid")
    config = EngineConfig(8 * MiB, block_size=4, preemption="swap", allocator=allocator)
    engine = Engine(checkpoint.path, config)
    assert engine.swapper is not None and engine.swapper.capacity_bytes == 16 * MiB
    assert engine.swapper.allocated_bytes == 0  # host memory is taken when first used
    round_trip(engine)
    assert 0 < engine.swapper.allocated_bytes <= 16 * MiB


def test_an_extent_across_arena_segments_round_trips(
    tiny_checkpoint: Callable[..., TinyCheckpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments far smaller than an extent: every copy is split, bytes still exact."""
    monkeypatch.setattr("avmp.engine.host_tier.SEGMENT_BYTES", 12 * 1024)
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(8 * MiB, block_size=4, preemption="swap"))
    round_trip(engine)
    assert engine.swapper is not None and len(engine.swapper._segments) > 2


def test_swap_in_refuses_too_few_pages(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(8 * MiB, block_size=4, preemption="swap"))
    swapper = engine.swapper
    assert swapper is not None
    units = engine.allocator.admit(0, 12)
    assert units is not None
    extent = HostTier(swapper.capacity_bytes).reserve(
        0, swapper.slot_unit_bytes + 3 * swapper.page_unit_bytes
    )
    assert extent is not None
    swapper.swap_out(0, units, extent)
    with pytest.raises(ValueError, match="3 saved pages, 2 to fill"):
        swapper.swap_in(0, RequestUnits(units.slot, units.pages[:2]), extent)
    with pytest.raises(ValueError, match="the units take"):
        swapper.swap_out(0, RequestUnits(units.slot, units.pages[:2]), extent)


@pytest.mark.parametrize("preemption", ["swap", "auto"])
def test_swapping_keeps_greedy_tokens_identical(
    preemption: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """The pressure run of test_memory_pressure (vLLM's greedy admission, so requests
    are preempted) with swaps: every output equals transformers' (``run`` checks), so
    it equals the run with ample memory. ``auto`` is given costs that make swapping
    every context cheaper than recomputing it (measured ones would depend on the
    machine's speed)."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY["granitemoehybrid"])
    costs = PreemptionCosts(prefill_s_per_token=1.0, host_bytes_per_s=1e12)
    engine = run(checkpoint, PRESSURE_LENGTHS, "cpu", preemption=preemption,
                 preemption_costs=costs)  # fmt: skip
    stats = engine.stats
    assert stats.num_swapped_out > 0 and stats.num_swapped_in == stats.num_swapped_out
    assert stats.swapped_bytes == engine.swapper.num_bytes_out + engine.swapper.num_bytes_in
    assert stats.num_recompute_tokens == 0  # every preempted request kept its cache
    assert engine.scheduler.host_tier.used_bytes == 0


def test_full_host_tier_falls_back_to_recompute(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """A host tier smaller than any request's units: every victim is recomputed, the
    tokens stay identical."""
    checkpoint = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY["granitemoehybrid"])
    engine = run(checkpoint, PRESSURE_LENGTHS, "cpu", preemption="swap", host_tier_bytes=4096)
    stats = engine.stats
    assert stats.num_preemptions > 0 and stats.num_recompute_tokens > 0
    assert stats.num_swapped_out == stats.swapped_bytes == 0


def test_auto_measures_its_costs(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(8 * MiB, block_size=4, max_num_batched_tokens=32))
    costs = engine.preemption_costs
    assert costs is not None and costs.prefill_s_per_token > 0 and costs.host_bytes_per_s > 0
    assert engine.scheduler.config.costs is costs
    assert engine.allocator.request_ids == []  # the timed chunk left nothing behind
    prompts = random_prompts([9, 3])
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=4), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 4)
    recompute = Engine(checkpoint.path, EngineConfig(8 * MiB, preemption="recompute"))
    assert recompute.preemption_costs is None and recompute.swapper is None
    # `auto` without a host tier has nothing to weigh: it recomputes, measuring nothing
    no_tier = Engine(checkpoint.path, EngineConfig(8 * MiB, host_tier_bytes=0))
    assert no_tier.preemption_costs is None and no_tier.swapper is None
    assert no_tier.scheduler.config.preemption is PreemptionMode.RECOMPUTE


def test_host_tier_size_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.engine.engine.host_available_bytes", lambda: 100 * MiB)
    assert resolve_host_tier_bytes(EngineConfig(8 * MiB)) == 16 * MiB  # twice the budget
    assert resolve_host_tier_bytes(EngineConfig(64 * MiB)) == 50 * MiB  # half the host
    assert resolve_host_tier_bytes(EngineConfig(8 * MiB, preemption="recompute")) == 0
    with pytest.raises(ValueError, match=r"host tier 200\.0 MiB is more than this host"):
        resolve_host_tier_bytes(EngineConfig(8 * MiB, host_tier_bytes=200 * MiB))
    with pytest.raises(ValueError, match="needs a host tier"):
        EngineConfig(8 * MiB, preemption="swap", host_tier_bytes=0)
    with pytest.raises(ValueError, match="preemption must be one of"):
        EngineConfig(8 * MiB, preemption="later")
    with pytest.raises(ValueError, match="admission must be one of"):
        EngineConfig(8 * MiB, admission="never")


def test_copy_bandwidth_is_measured() -> None:
    assert measure_copy_bandwidth(torch.device("cpu"), 1 * MiB) > 0


# ---- on the GPU ------------------------------------------------------------------------


@cuda
def test_cuda_vmm_swap_round_trip_and_identity(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """Byte-exact on CUDA VMM, and the pressure run's tokens identical with swaps."""
    checkpoint = tiny_checkpoint("granitemoehybrid")
    config = EngineConfig(8 * MiB, device="cuda", backing="cuda_vmm", block_size=4,
                          preemption="swap")  # fmt: skip
    engine = Engine(checkpoint.path, config)
    assert engine.swapper is not None and engine.swapper.pinned
    round_trip(engine)
    heavy = tiny_checkpoint("granitemoehybrid", eos_token_id=None, **HEAVY["granitemoehybrid"])
    engine = run(heavy, PRESSURE_LENGTHS, "cuda", preemption="swap", backing="cuda_vmm")
    assert engine.stats.num_swapped_out > 0 and engine.stats.num_recompute_tokens == 0


@cuda
def test_copies_run_on_the_copy_stream(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """With the compute stream busy (a sleep kernel), `swap_out` returns at once, its
    copy waits on the copy stream for the compute stream's work, and lands after it."""
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(8 * MiB, device="cuda", preemption="swap"))
    swapper = engine.swapper
    assert swapper is not None and swapper.copy_stream is not None
    units = engine.allocator.admit(0, 64)
    assert units is not None
    num_bytes = swapper.slot_unit_bytes + len(units.pages) * swapper.page_unit_bytes
    extent = HostTier(swapper.capacity_bytes).reserve(0, num_bytes)
    assert extent is not None
    fill_random(engine, units, seed=4)
    swapper.swap_out(0, units, extent)  # warm: kernels loaded, staging memory cached
    torch.cuda.synchronize()
    expected = swapper.host_bytes(extent.offset, num_bytes)
    for piece, _ in swapper._host_pieces(extent.offset, num_bytes):
        piece.zero_()
    start = time.perf_counter()
    torch.cuda._sleep(1 << 30)  # about half a second of one SM's clock
    swapper.swap_out(0, units, extent)
    issued_s = time.perf_counter() - start
    assert not swapper.copy_stream.query()  # its copy waits behind the sleep
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    assert issued_s < total_s / 4, (issued_s, total_s)  # the host did not wait
    assert torch.equal(swapper.host_bytes(extent.offset, num_bytes), expected)
