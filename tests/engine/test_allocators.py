"""The engine on the baselines' layouts: SGLang's fixed split and vLLM's padded unified
pool run the same kernels as AVMP, and give transformers' tokens under memory pressure."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_helpers import DEVICES, MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig
from avmp.memory.manager import AvmpManager
from avmp.memory.spec import PoolKind
from avmp.memory.unified import UnifiedAllocator

MAX_TOKENS = 12
# 2 attention and 4 Mamba2 layers: vLLM groups them by 2, so a request's state takes two
# 80-token blocks (320 KiB each: five 16-token kernel pages); the state is ~540 KiB.
GRANITE = dict(
    hidden_size=256, intermediate_size=64, shared_intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=2, num_local_experts=0, num_hidden_layers=6,
    layer_types=["mamba", "attention", "mamba", "attention", "mamba", "mamba"],
    mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
    mamba_chunk_size=32, eos_token_id=None,
)  # fmt: skip
LENGTHS = [4] * 6 + [150] * 3 + [4] * 6


def run(checkpoint: TinyCheckpoint, allocator: str, device: str) -> Engine:
    """Under memory pressure with vLLM v1's policies (greedy admission, recompute), which
    preempt here, where growth-aware admission would not."""
    config = EngineConfig(
        preemption="recompute",
        admission="greedy",
        memory_bytes=6 * MiB,
        device=device,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        check_integrity=True,
        allocator=allocator,
    )
    engine = Engine(checkpoint.path, config)
    prompts = random_prompts(LENGTHS, seed=4)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.finish_reason == "length", output.error
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
    return engine


@pytest.mark.parametrize("device", DEVICES)
def test_static_split_gives_reference_tokens_without_migrating(
    device: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    engine = run(tiny_checkpoint("granitemoehybrid", **GRANITE), "static", device)
    manager = engine.allocator
    assert isinstance(manager, AvmpManager) and manager.name == "static"
    slots = manager.num_units(PoolKind.STATE)  # 47% of 6 MiB: one chunk, three slots
    assert slots == 3 and manager.stats.num_oom_events > 0
    assert max(t["num_running"] for t in engine.stats.timeline) == slots  # KV was never short
    assert manager.stats.num_migrations == 0 and manager.stats.num_compactions == 0
    assert engine.stats.peak_state_capacity_bytes == len(manager.pool_chunks(PoolKind.STATE)) * (
        manager.config.chunk_bytes
    )


@pytest.mark.parametrize("device", DEVICES)
def test_unified_pool_gives_reference_tokens(
    device: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    engine = run(tiny_checkpoint("granitemoehybrid", **GRANITE), "unified", device)
    unified = engine.allocator
    assert isinstance(unified, UnifiedAllocator)
    assert unified.vllm.block_size == 80 and unified.vllm.num_state_groups == 2
    assert engine.stats.num_preemptions > 0
    assert engine.stats.usage is not None and engine.stats.usage.num_requests == 0
    unified.check_integrity()


def test_timeline_and_per_prompt_limits(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    engine = Engine(tiny_checkpoint("granitemoehybrid", **GRANITE).path, EngineConfig(6 * MiB))
    outputs = engine.generate(random_prompts([5, 9, 7]), max_tokens=[2, 4, 3])
    assert [len(o.token_ids) for o in outputs] == [2, 4, 3]
    timeline = engine.stats.timeline
    assert 0 < len(timeline) <= engine.stats.num_steps
    assert all(a["t_s"] <= b["t_s"] for a, b in zip(timeline, timeline[1:], strict=False))
    assert max(t["num_running"] for t in timeline) == 3


def test_bad_allocator_arguments_are_refused(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    path = tiny_checkpoint("granitemoehybrid", **GRANITE).path
    with pytest.raises(ValueError, match="allocator must be one of"):
        EngineConfig(6 * MiB, allocator="paged")
    with pytest.raises(ValueError, match="static allocator only"):
        EngineConfig(6 * MiB, state_fraction=0.3)
    with pytest.raises(ValueError, match="one plain buffer"):
        EngineConfig(6 * MiB, device="cuda", allocator="unified", backing="cuda_vmm")
    with pytest.raises(ValueError, match="max_tokens"):
        Engine(path, EngineConfig(6 * MiB)).generate([[3, 4]], max_tokens=[1, 2])
