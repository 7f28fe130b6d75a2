"""LFM2 in the engine: short convolutions whose slot holds a conv window and nothing
else, beyond the families' common tests (token identity, logits, geometry and memory
pressure run LFM2 through ``CONFIGS`` and ``HEAVY``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, lfm2_config, random_prompts, transformers

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.models.lfm2 import Lfm2Model, lfm2_mlp_width
from avmp.engine.tiny import tiny_model
from avmp.models.geometry import ConvColumns, LayerKind
from avmp.models.hf import geometry_from_config
from avmp.models.zoo import zoo_config

MAX_TOKENS = 8


@pytest.mark.parametrize("columns", list(ConvColumns))
def test_slot_holds_conv_windows_only(
    columns: ConvColumns, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Each short convolution caches ``hidden x columns`` conv inputs and no SSM state;
    with either column layout the tokens are transformers'."""
    checkpoint = tiny_checkpoint("lfm2")
    config = EngineConfig(
        memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=8, conv_columns=columns
    )
    engine = Engine(checkpoint.path, config)
    geometry = engine.geometry
    assert [r.layer_index for r in geometry.recurrent_layers] == [0, 2, 3]
    assert {r.kind for r in geometry.recurrent_layers} == {LayerKind.SHORT_CONV}
    assert geometry.ssm_bytes_per_request == 0
    assert geometry.state_bytes_per_request == 3 * 64 * columns.columns(3) * 4
    prompts = random_prompts([13, 5, 1], seed=3)
    for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=6), strict=True):
        assert output.token_ids == checkpoint.reference(prompt, 6)


@pytest.mark.parametrize(
    "overrides",
    [
        # the first LFM2 checkpoints list attention layers, not layer types
        dict(layer_types=None, full_attn_idxs=[0, 2], num_hidden_layers=4, conv_bias=False),
        dict(block_auto_adjust_ff_dim=False, num_key_value_heads=4),
    ],
    ids=["full-attn-idxs", "plain-mlp-width"],
)
def test_variants_match_transformers(
    overrides: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    kwargs = {**lfm2_config().to_dict(), **overrides}
    for key in ("model_type", "transformers_version", "architectures"):
        kwargs.pop(key, None)
    config = transformers.Lfm2Config(**kwargs)
    checkpoint = TinyCheckpoint(config, tmp_path_factory.mktemp("lfm2"))
    prompts = random_prompts([6, 17, 2])
    engine_config = EngineConfig(memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=10)
    outputs = Engine(checkpoint.path, engine_config).generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)
    ours = geometry_from_config(checkpoint.path, kv_dtype="float32")
    assert [a.layer_index for a in ours.attention_layers] == [
        i for i, kind in enumerate(config.layer_types) if kind == "full_attention"
    ]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(block_auto_adjust_ff_dim=False),
        dict(block_ffn_dim_multiplier=1.3, block_multiple_of=48),
    ],
)
def test_mlp_width_is_transformers(options: dict[str, Any]) -> None:
    """The SwiGLU width the engine builds and the one the config reader counts are the
    width transformers builds, through its auto-adjust rules."""
    config = transformers.Lfm2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=16, intermediate_size=200, layer_types=["conv"], **options,
    )  # fmt: skip
    theirs = transformers.Lfm2ForCausalLM(config).model.layers[0].feed_forward.w1.weight.shape[0]
    assert lfm2_mlp_width(config) == theirs
    raw = {"model_type": "lfm2", **config.to_dict()}
    # the reader counts 3 * hidden * width MLP parameters: one MLP channel less, 96 fewer
    narrower = {**raw, "block_auto_adjust_ff_dim": False, "intermediate_size": theirs - 1}
    assert geometry_from_config(raw).num_params - geometry_from_config(narrower).num_params == 96


def test_tiny_zoo_model_keeps_lfm2_1_2b_pattern() -> None:
    """LFM2-1.2B: 10 short convolutions, attention at layers 2, 5, 8, 10, 12 and 14."""
    raw = zoo_config("lfm2-1.2b")
    model = tiny_model(raw)
    assert isinstance(model, Lfm2Model)
    ours = model.geometry(torch.float32)
    published = geometry_from_config(raw)
    assert [a.layer_index for a in ours.attention_layers] == [2, 5, 8, 10, 12, 14]
    assert [a.layer_index for a in published.attention_layers] == [2, 5, 8, 10, 12, 14]
    assert [r.layer_index for r in ours.recurrent_layers] == [
        r.layer_index for r in published.recurrent_layers
    ]
    assert published.state_bytes_per_request == 10 * 2048 * 2 * 2  # bf16, d_conv - 1 columns
