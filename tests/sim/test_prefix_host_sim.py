"""The prefix cache in the simulator: its rules priced at the run's own device (GPU
profile and time model), one resolution of a policy name, and the host tier as a second
level for evicted checkpoints, its copies charged at the profile's host link."""

from __future__ import annotations

import math

import pytest

from avmp.bench.workloads import make_prefix_workload
from avmp.memory.registry import make_allocator
from avmp.memory.spec import MemoryConfig
from avmp.memory.unified import VllmBlockGeometry
from avmp.models import resolve_model
from avmp.sched.prefix import DeviceRates, ReuseLedger, prefill_flops, prefix_cache_config
from avmp.sim.simulator import SimConfig, simulate
from avmp.sim.timing import RooflineModel, get_profile, prefill_s_per_token

GIB = 1 << 30


def test_the_rules_rates_come_from_the_run_s_profile_and_time_model() -> None:
    geometry = resolve_model("nemotron-h-8b")
    config = SimConfig(profile="a100", prefix_cache="avmp")
    cache = config.prefix_cache_config(geometry, 16)
    assert cache is not None
    profile = get_profile("a100")
    chunk = config.max_num_batched_tokens
    per_token = prefill_s_per_token(RooflineModel(geometry, profile), chunk)
    assert math.isclose(
        cache.device_flops_per_s, prefill_flops(geometry, chunk) / chunk / per_token
    )
    assert cache.device_flops_per_s < profile.bf16_flops_per_s  # what a step achieves
    assert cache.host_bytes_per_s == profile.host_link_bytes_per_s
    assert cache.compaction_bytes_per_s == profile.effective_bytes_per_s / 2
    assert cache.migration_s_per_chunk == config.migration_s_per_chunk
    moved = SimConfig(profile="a100", prefix_cache="avmp", compaction_bytes_per_s=1e9,
                      migration_s_per_chunk=1e-3).prefix_cache_config(geometry, 16)  # fmt: skip
    assert moved is not None
    assert (moved.compaction_bytes_per_s, moved.migration_s_per_chunk) == (1e9, 1e-3)


def test_a_slower_device_changes_the_reuse_decision() -> None:
    """The same hit saves more prefill time on an RTX 3060 than on an H200, so a chunk
    move that the H200's savings do not cover, the 3060's do."""
    geometry = resolve_model("nemotron-h-8b")
    saved = prefill_flops(geometry, 256)
    configs = {name: SimConfig(profile=name, prefix_cache="avmp").prefix_cache_config(geometry, 16)
               for name in ("h200", "rtx3060")}  # fmt: skip
    saved_s = {name: saved / c.device_flops_per_s for name, c in configs.items() if c}
    move_s = math.sqrt(saved_s["h200"] * saved_s["rtx3060"])  # between the two
    decisions = {}
    for name, cache in configs.items():
        assert cache is not None
        ledger = ReuseLedger(cache)
        ledger.admitted(saved)
        decisions[name] = ledger.pays_for(move_s)
    assert decisions == {"h200": False, "rtx3060": True}


def test_one_resolution_of_a_policy_name() -> None:
    geometry = resolve_model("nemotron-h-8b")
    assert prefix_cache_config("off", geometry, 16) is None
    avmp = prefix_cache_config("avmp", geometry, 16)
    assert avmp is not None and not avmp.host_level
    assert (avmp.eviction, avmp.room) == ("flops", "reuse")
    align = prefix_cache_config("vllm-align", geometry, 16)
    assert align is not None and align.eviction == "lru"
    assert align.align_tokens == VllmBlockGeometry.from_geometry(geometry, 16).block_size
    rates = DeviceRates(1e12, 1e-4, 1e11, 1e10)
    priced = prefix_cache_config("sglang", geometry, 16, "flops", rates, host_level=True)
    assert priced is not None and priced.rates == rates and priced.eviction == "flops"
    assert priced.host_level
    config = SimConfig(profile="h200", prefix_cache="sglang", prefix_host_level=True)
    model = config.time_model(geometry)
    assert config.prefix_cache_config(geometry, 16, model) == prefix_cache_config(
        "sglang", geometry, 16, None, config.prefix_rates(geometry, model), host_level=True
    )
    with pytest.raises(ValueError, match="unknown prefix cache"):
        prefix_cache_config("lru", geometry, 16)
    with pytest.raises(ValueError, match="host_bytes_per_s must be a positive finite"):
        DeviceRates(host_bytes_per_s=0.0)


def _run(host_level: bool, profile: str = "h200") -> tuple[dict, float, float, float, int]:  # type: ignore[type-arg]
    geometry = resolve_model("nemotron-h-8b")
    specs = make_prefix_workload("multi_turn_prefix", 0, 96)
    allocator = make_allocator("avmp", geometry, MemoryConfig(2 * GIB))
    config = SimConfig(profile=profile, prefix_cache="avmp", prefix_host_level=host_level,
                       timeline_samples=0)  # fmt: skip
    result = simulate(specs, allocator, geometry, config)
    return (result.prefix, result.ttft_p50_s, result.ttft_p99_s, result.phase_s["swap"],
            result.num_swap_bytes)  # fmt: skip


def test_the_host_level_restores_what_the_device_level_evicted() -> None:
    """Multi-turn conversations of Nemotron-H-8B in 2 GiB: the device level evicts most
    checkpoints before the next turn; the host level keeps them, and the next turns hit
    from it: more hit tokens and lower TTFT, each copy charged at the host link."""
    without, p50_off, p99_off, swap_off, swapped_off = _run(host_level=False)
    with_host, p50_on, p99_on, swap_on, swapped = _run(host_level=True)
    assert "host_level" not in without  # the report is unchanged without it
    host = with_host["host_level"]
    assert host["num_restored"] > 0 and host["num_kept"] >= host["num_restored"] // 2
    assert with_host["num_hit_tokens"] > without["num_hit_tokens"]
    assert 0 < host["num_hit_tokens"] <= with_host["num_hit_tokens"]
    assert p50_on < p50_off and p99_on < p99_off
    link = get_profile("h200").host_link_bytes_per_s
    copied = host["num_bytes_out"] + host["num_bytes_in"]
    assert math.isclose(swap_on, (copied + swapped) / link)  # requests' swaps and these
    assert math.isclose(swap_off, swapped_off / link)


def test_a_host_level_without_a_host_tier_is_one_line() -> None:
    geometry = resolve_model("granite-4.0-h-tiny")
    specs = make_prefix_workload("multi_turn_prefix", 0, 4)
    for options in ({"preemption": "recompute"}, {"host_tier_bytes": 0}):
        allocator = make_allocator("avmp", geometry, MemoryConfig(8 * GIB))
        config = SimConfig(prefix_cache="avmp", prefix_host_level=True, **options)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="host level keeps checkpoints in the host tier"):
            simulate(specs, allocator, geometry, config)
