"""Token identity under memory pressure: requests preempted and recomputed, and AVMP
migrating chunks between the pools and compacting a pool's tail mid-run.

Each family's model has per-request state (~270-290 KiB) and KV (8 KiB per token)
large against 2 MiB chunks, so a 6 MiB budget (3 chunks) runs out within a few hundred
tokens and the pools must trade chunks as the prompt mix shifts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from engine_helpers import DEVICES, MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig
from avmp.models.geometry import ConvColumns

MAX_TOKENS = 12
# Every family sized alike: 8 KiB of KV per token, ~270-290 KiB of state per request.
HEAVY: dict[str, dict[str, Any]] = {
    "bamba": dict(
        hidden_size=256, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=2, attn_layer_indices=[1, 2, 3, 4], mamba_n_heads=8,
        mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=32,
    ),
    "granitemoehybrid": dict(
        hidden_size=256, intermediate_size=64, shared_intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=0,
        num_hidden_layers=6,
        layer_types=["mamba", "attention", "attention", "attention", "attention", "mamba"],
        mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
        mamba_chunk_size=32,
    ),
    "nemotron_h": dict(
        hidden_size=256, intermediate_size=128,
        layers_block_type=["linear_attention", "full_attention", "full_attention", "mlp",
                           "full_attention", "full_attention", "linear_attention"],
        num_attention_heads=2, num_key_value_heads=2, head_dim=128, mamba_num_heads=8,
        mamba_head_dim=64, ssm_state_size=64, n_groups=1, chunk_size=32,
    ),
    "falcon_h1": dict(
        hidden_size=256, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=128, mamba_n_heads=8, mamba_d_head=32,
        mamba_d_ssm=256, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=32,
    ),
    "jamba": dict(
        hidden_size=512, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_experts=1, mamba_d_state=32, mamba_expand=2,
        mamba_dt_rank=16,
    ),
    **{
        family: dict(
            hidden_size=256, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=2, head_dim=256, num_experts=experts,
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "full_attention", "linear_attention", "linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
            linear_value_head_dim=64,
        )
        for family, experts in (("qwen3_next", 0), ("qwen3_5", 0), ("qwen3_5_moe", 4))
    },
    "zamba2": dict(
        hidden_size=256, intermediate_size=128, layers_block_type=["hybrid", "hybrid"],
        num_attention_heads=2, num_key_value_heads=2, use_shared_attention_adapter=False,
        n_mamba_heads=8, mamba_d_state=64, mamba_ngroups=1, chunk_size=32,
    ),
    # a conv window of 32 columns (33 taps; LFM2 has 3) so the state weighs as much
    "lfm2": dict(
        hidden_size=256, intermediate_size=128, block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
                     "full_attention", "conv", "conv", "full_attention", "conv", "conv"],
        num_attention_heads=2, num_key_value_heads=2, conv_L_cache=33,
    ),
    "minimax": dict(
        hidden_size=256, intermediate_size=64, num_local_experts=1, num_experts_per_tok=1,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention",
                     "linear_attention", "full_attention", "linear_attention", "full_attention",
                     "linear_attention"],
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, block_size=16,
    ),
}  # fmt: skip


def run(checkpoint: TinyCheckpoint, lengths: list[int], device: str, **options: Any) -> Engine:
    """The pressure run; by default with vLLM v1's policies (greedy admission, recompute),
    which preempt here, where growth-aware admission would not."""
    config = EngineConfig(
        memory_bytes=6 * MiB,
        device=device,
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        check_integrity=True,
        **{"preemption": "recompute", "admission": "greedy", **options},
    )
    engine = Engine(checkpoint.path, config)
    prompts = random_prompts(lengths)
    outputs = engine.generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.finish_reason == "length"
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
    return engine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(HEAVY))
def test_identical_through_preemption_migration_and_compaction(
    family: str, device: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Short requests fill the state pool, long ones then need KV that only the state
    pool can give (migration state -> KV, compacting its tail), the pools run out
    (preemption, recompute), and the short ones at the end pull chunks back."""
    # no end-of-sequence token: every request runs to max_tokens, so the memory pressure
    # (and which events happen) does not depend on what the random model writes
    checkpoint = tiny_checkpoint(family, eos_token_id=None, **HEAVY[family])
    engine = run(checkpoint, [4] * 8 + [120] * 4 + [4] * 8, device)
    assert engine.geometry.kv_bytes_per_token == 8192
    stats = engine.stats
    assert stats.num_preemptions > 0 and stats.num_recompute_tokens > 0
    moved = stats.allocator
    assert moved.chunks_migrated_to["kv"] > 0 and moved.chunks_migrated_to["state"] > 0
    assert moved.num_compactions > 0 and moved.num_units_moved > 0
    usage = stats.usage
    assert usage is not None and usage.num_requests == 0
    assert usage.kv_capacity_bytes + usage.state_capacity_bytes <= usage.budget_bytes


def test_conv_state_with_d_conv_columns_and_fp32_ssm(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """transformers' layout (``d_conv`` columns) gives the same tokens as vLLM's."""
    checkpoint = tiny_checkpoint("granitemoehybrid")
    config = EngineConfig(
        memory_bytes=4 * MiB,
        block_size=4,
        max_num_batched_tokens=8,
        conv_columns=ConvColumns.TRANSFORMERS,
        ssm_dtype="float32",
    )
    engine = Engine(checkpoint.path, config)
    layer = engine.geometry.recurrent_layers[0]
    assert layer.conv is not None and layer.conv.shape[1] == 4
    prompts = random_prompts([13, 5], seed=3)
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=6), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 6)


def test_request_that_can_never_fit_is_rejected_with_a_reason(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """One 2 MiB chunk cannot hold a page and a slot at once: nothing can ever run."""
    checkpoint = tiny_checkpoint("granitemoehybrid")
    engine = Engine(checkpoint.path, EngineConfig(2 * MiB, block_size=4))
    (output,) = engine.generate(random_prompts([5]), max_tokens=3)
    assert output.finish_reason == "rejected"
    assert output.token_ids == [] and output.error
