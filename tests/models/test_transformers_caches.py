"""Cross-check: our geometry against the caches transformers really allocates.

For each family, a tiny random model (a few layers, tiny dims, CPU, bfloat16) runs one
forward with ``use_cache=True``; every cached tensor's shape and dtype must be what
`geometry_from_config(..., conv_columns="transformers")` says, layer by layer.
"""

from __future__ import annotations

from typing import Any

import pytest

from avmp.models import ModelGeometry, geometry_from_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BATCH, TOKENS = 2, 5
VOCAB = 64

_TINY: dict[str, dict[str, Any]] = {
    "lfm2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "layer_types": ["conv", "full_attention", "conv", "conv"],
        "conv_L_cache": 3,
    },
    "jamba": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "num_experts": 2,
        "mamba_d_state": 8,
        "mamba_dt_rank": 4,
        "mamba_d_conv": 3,
    },
    "bamba": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attn_layer_indices": [1],
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_n_groups": 2,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
    },
    "granitemoehybrid": {
        "hidden_size": 32,
        "intermediate_size": 16,
        "shared_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "layer_types": ["mamba", "attention", "mamba"],
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "mamba_n_heads": 8,
        "mamba_n_groups": 1,
        "mamba_d_state": 16,
        "mamba_chunk_size": 8,
    },
    "nemotron_h": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "hybrid_override_pattern": "M-*EM",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "mamba_num_heads": 6,
        "mamba_head_dim": 8,
        "n_groups": 2,
        "ssm_state_size": 8,
        "chunk_size": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16,
    },
    "falcon_h1": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "mamba_d_ssm": 48,
        "mamba_n_heads": 6,
        "mamba_d_head": 8,
        "mamba_n_groups": 2,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
    },
    "zamba2": {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
        "num_hidden_layers": 4,
        "n_mamba_heads": 4,
        "mamba_d_state": 8,
        "mamba_ngroups": 1,
        "chunk_size": 8,
        "num_mem_blocks": 1,
        "intermediate_size": 64,
    },
    "qwen3_next": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 12,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "full_attention_interval": 2,
    },
    "mamba2": {
        "hidden_size": 32,
        "num_heads": 8,
        "head_dim": 8,
        "state_size": 8,
        "n_groups": 2,
        "num_hidden_layers": 2,
        "chunk_size": 8,
    },
    "minimax": {
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
        "block_size": 4,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    },
}


# transformers keeps these recurrent states in float32 even in a bfloat16 model.
_SSM_DTYPE_IN_TRANSFORMERS = {
    "jamba": "float32",
    "bamba": "float32",
    "granitemoehybrid": "float32",
    "nemotron_h": "float32",
    "falcon_h1": "float32",
    "zamba2": "float32",
    "qwen3_next": "float32",
    "minimax": "bfloat16",
    "lfm2": "bfloat16",  # no SSM state: its short convolutions keep a conv window only
    "mamba2": "float32",
}


def _run_tiny(model_type: str, config: dict[str, Any]) -> Any:
    """Build the tiny random model, run one forward, return its cache."""
    torch.manual_seed(0)
    hf_config = transformers.CONFIG_MAPPING[model_type](vocab_size=VOCAB, **config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (BATCH, TOKENS)), use_cache=True)
    # Pure Mamba2 returns its cache as ``cache_params``.
    return out.past_key_values if "past_key_values" in out else out.cache_params


def _first(states: Any) -> Any:
    """conv_states / recurrent_states hold one tensor per state index (0 here)."""
    return states[0] if isinstance(states, (list, tuple, dict)) else states


def _cache_by_layer(cache: Any) -> tuple[dict[int, Any], dict[int, Any], dict[int, Any]]:
    keys, convs, ssms = {}, {}, {}
    for index, layer in enumerate(cache.layers):
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            keys[index] = layer.keys
        conv = _first(getattr(layer, "conv_states", None) or {0: None})
        ssm = _first(getattr(layer, "recurrent_states", None) or {0: None})
        if isinstance(conv, torch.Tensor):
            convs[index] = conv
        if isinstance(ssm, torch.Tensor):
            ssms[index] = ssm
    # MiniMax keeps lightning-attention state outside its layers, one entry per layer.
    for index, state in enumerate(getattr(cache, "linear_cache", [])):
        if isinstance(state, torch.Tensor):
            ssms[index] = state
    return keys, convs, ssms


def _dtype(name: str) -> Any:
    return getattr(torch, name)


def _check(geometry: ModelGeometry, cache: Any) -> None:
    keys, convs, ssms = _cache_by_layer(cache)
    assert sorted(keys) == [layer.layer_index for layer in geometry.attention_layers]
    expected_ssms = [r.layer_index for r in geometry.recurrent_layers if r.ssm is not None]
    assert sorted(ssms) == expected_ssms
    expected_convs = [r.layer_index for r in geometry.recurrent_layers if r.conv is not None]
    assert sorted(convs) == expected_convs
    for attn in geometry.attention_layers:
        k = keys[attn.layer_index]
        assert tuple(k.shape) == (BATCH, attn.num_kv_heads, TOKENS, attn.head_dim)
        assert k.dtype == _dtype(attn.dtype)
    for rec in geometry.recurrent_layers:
        if rec.ssm is not None:
            ssm = ssms[rec.layer_index]
            expected = ((BATCH, *rec.ssm.shape), _dtype(rec.ssm.dtype))
            assert (tuple(ssm.shape), ssm.dtype) == expected
        if rec.conv is not None:
            conv = convs[rec.layer_index]
            assert (tuple(conv.shape), conv.dtype) == (
                (BATCH, *rec.conv.shape),
                _dtype(rec.conv.dtype),
            )


@pytest.mark.parametrize("model_type", sorted(_TINY))
def test_transformers_cache_matches_geometry(model_type: str) -> None:
    config = _TINY[model_type]
    geometry = geometry_from_config(
        {"model_type": model_type, "vocab_size": VOCAB, **config},
        conv_columns="transformers",
        ssm_dtype=_SSM_DTYPE_IN_TRANSFORMERS[model_type],
    )
    _check(geometry, _run_tiny(model_type, config))
