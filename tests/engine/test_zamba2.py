"""Zamba2 in the engine: shared transformer blocks (one set of weights, one KV cache per
use, per-use adapters), checked against transformers beyond the families' common tests
(token identity, logits, geometry and memory pressure run Zamba2 through ``CONFIGS``
and ``HEAVY``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_helpers import MiB, TinyCheckpoint, random_prompts, zamba2_config

from avmp.engine.engine import Engine, EngineConfig
from avmp.engine.loader import load_model, read_tensors, weight_files
from avmp.engine.models.zamba2 import Zamba2HybridLayer, Zamba2Model
from avmp.engine.tiny import tiny_model
from avmp.models.hf import geometry_from_config
from avmp.models.zoo import zoo_config

MAX_TOKENS = 8


def hybrid_layers(model: Zamba2Model) -> list[Zamba2HybridLayer]:
    return [layer for layer in model.model.layers if isinstance(layer, Zamba2HybridLayer)]


def test_shared_blocks_load_once_and_serve_every_use(
    tiny_checkpoint: Callable[..., TinyCheckpoint],
) -> None:
    """The checkpoint holds each shared block under its first use; later uses run the
    same weights (block 0 at hybrid layers 1 and 4) with their own adapters."""
    checkpoint = tiny_checkpoint("zamba2")
    model = load_model(checkpoint.path)
    assert isinstance(model, Zamba2Model)
    saved = set(read_tensors(weight_files(checkpoint.path)))
    assert set(model.state_dict()) - set(model.tied_weights) == saved
    first, second, third = hybrid_layers(model)
    block = first._borrowed[0]
    assert third._borrowed[0] is block and second._borrowed[0] is not block
    adapters = block.self_attn.linear_q_adapter_list
    assert not torch.equal(adapters[0][0].weight, adapters[2][0].weight)


def test_each_use_has_its_own_kv_cache(tiny_checkpoint: Callable[..., TinyCheckpoint]) -> None:
    """Three uses of two blocks: three attention layers of twice-wide heads, keyed by
    the hybrid layers, as the config reader counts them."""
    path = tiny_checkpoint("zamba2").path
    ours = load_model(path).geometry(torch.float32)
    theirs = geometry_from_config(path, kv_dtype="float32")
    assert [a.layer_index for a in ours.attention_layers] == [1, 3, 4]
    assert all(a.head_dim == 2 * 64 // 4 for a in ours.attention_layers)
    assert ours.attention_layers == theirs.attention_layers
    assert len(ours.recurrent_layers) == 6


@pytest.mark.parametrize(
    "overrides",
    [
        # grouped-query attention, no adapters, no rotary: Zamba2-2.7B's published options
        dict(num_key_value_heads=2, use_shared_attention_adapter=False, use_mem_rope=False),
        # one block for every hybrid layer
        dict(num_mem_blocks=1, hidden_act="silu"),
    ],
    ids=["gqa-no-adapters", "one-block"],
)
def test_variants_match_transformers(
    overrides: dict[str, object], tiny_checkpoint: Callable[..., TinyCheckpoint]
) -> None:
    checkpoint = tiny_checkpoint("zamba2", **overrides)
    prompts = random_prompts([6, 17, 2])
    config = EngineConfig(memory_bytes=4 * MiB, block_size=4, max_num_batched_tokens=10)
    outputs = Engine(checkpoint.path, config).generate(prompts, max_tokens=MAX_TOKENS)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == checkpoint.reference(prompt, MAX_TOKENS)


def test_adapters_with_grouped_kv_heads_are_refused() -> None:
    """transformers' k/v adapters are as wide as q: with fewer KV heads their sum is
    shape-invalid, so such a config is refused with a reason, not a shape error later."""
    config = zamba2_config(num_key_value_heads=2, use_shared_attention_adapter=True)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Zamba2Model(config)


def test_tiny_zoo_model_keeps_zamba2_2_7b_pattern() -> None:
    """The published Zamba2-2.7B: 54 Mamba2 layers, 9 shared-block uses of 2 blocks."""
    raw = zoo_config("zamba2-2.7b")
    model = tiny_model(raw)
    assert isinstance(model, Zamba2Model)
    ours = model.geometry(torch.float32)
    published = geometry_from_config(raw)
    assert ours.num_layers == published.num_layers == 54
    assert [a.layer_index for a in ours.attention_layers] == [
        a.layer_index for a in published.attention_layers
    ]
    assert len(ours.attention_layers) == 9 and len(ours.recurrent_layers) == 54
    assert len({id(layer._borrowed[0]) for layer in hybrid_layers(model)}) == 2
