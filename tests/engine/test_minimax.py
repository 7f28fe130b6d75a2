"""MiniMax-Text-01 in the engine: lightning layers whose slot entry is one matrix per
head and no conv, beyond the families' common tests (token identity, logits, geometry
and memory pressure run MiniMax through ``CONFIGS`` and ``HEAVY``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.loader import CheckpointError, load_model, read_tensors, weight_files
from avmp.engine.models.minimax import LightningAttention, MiniMaxModel
from avmp.models.geometry import LayerKind


def test_decay_tables_in_the_checkpoint_are_recomputed(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """transformers saves each lightning layer's decay tables; the engine drops them on
    load and computes the same slopes from the config."""
    checkpoint = tiny_checkpoint("minimax")
    assert any(name.endswith("slope_rate") for name in read_tensors(weight_files(checkpoint.path)))
    model = load_model(checkpoint.path)
    assert isinstance(model, MiniMaxModel)
    ours = [m for m in model.modules() if isinstance(m, LightningAttention)]
    theirs = [
        layer.self_attn
        for layer in checkpoint.hf.model.layers
        if layer.block_type == "linear_attention"
    ]  # noqa: E501
    assert len(ours) == len(theirs) == 2
    for mine, hf in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.slope_rate, hf.slope_rate.flatten())


def test_a_missing_weight_is_still_an_error(
    tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path: pytest.TempPathFactory
) -> None:
    from safetensors.torch import save_file

    source = tiny_checkpoint("minimax").path
    tensors = read_tensors(weight_files(source))
    del tensors["model.layers.0.self_attn.qkv_proj.weight"]
    target = tmp_path / "broken"  # type: ignore[operator]
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match="qkv_proj"):
        load_model(target)


@pytest.mark.parametrize("ssm_dtype", ["float32", "bfloat16"])
def test_lightning_state_is_one_matrix_per_head(
    ssm_dtype: str, tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    """Each lightning layer caches ``[heads, head_dim, head_dim]`` in the state dtype
    and nothing else; softmax attention keeps its pages."""
    checkpoint = tiny_checkpoint("minimax")
    config = EngineConfig(memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=10,
                          ssm_dtype=ssm_dtype)  # fmt: skip
    engine = Engine(checkpoint.path, config)
    geometry = engine.geometry
    assert [a.layer_index for a in geometry.attention_layers] == [1]
    for layer in geometry.recurrent_layers:
        assert layer.kind is LayerKind.LIGHTNING and layer.conv is None
        assert layer.ssm is not None and layer.ssm.shape == (4, 16, 16)
        assert layer.ssm.dtype == ssm_dtype
    assert geometry.conv_bytes_per_request == 0
    if ssm_dtype == "float32":  # a bf16 state rounds: tokens may then differ
        prompts = random_prompts([7, 20, 1])
        for prompt, output in zip(prompts, engine.generate(prompts, max_tokens=6), strict=True):
            assert output.token_ids == checkpoint.reference(prompt, 6)
