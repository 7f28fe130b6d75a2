"""Tiny random-weight models with the layer structure of a real one, for demos that
need no download (``avmp generate granite-4.0-h-tiny --random-weights --scale tiny``).

The published config keeps its family, layer pattern and options; only the widths
shrink (hidden 64, 4 heads, Mamba heads of 16 channels, at most 4 experts) and the
vocabulary becomes the 32,000 tokens of the Mistral tokenizer bundled in mistral-common.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from avmp.engine.models import model_class, supported_families
from avmp.engine.models.base import HybridModel

TINY_VOCAB = 32000

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY_VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "dtype": "float32",
}
_MAMBA2_GRANITE_STYLE = {
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "mamba_chunk_size": 64,
}
_FAMILY: dict[str, dict[str, Any]] = {
    "granitemoehybrid": {**_MAMBA2_GRANITE_STYLE, "shared_intermediate_size": 64},
    "bamba": dict(_MAMBA2_GRANITE_STYLE),
    "falcon_h1": {**_MAMBA2_GRANITE_STYLE, "mamba_d_ssm": 128, "head_dim": 16},
    "nemotron_h": {
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 1,
        "chunk_size": 64,
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32,
        "n_group": 1,
        "topk_group": 1,
        "moe_latent_size": None,
    },
    "jamba": {"mamba_d_state": 8, "mamba_dt_rank": 8, "mamba_expand": 2},
    **dict.fromkeys(
        ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"),
        {
            "head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "zamba2": {
        "n_mamba_heads": 8,
        "mamba_d_state": 16,
        "mamba_ngroups": 1,
        "mamba_expand": 2,
        "chunk_size": 64,
        "adapter_rank": 8,
        "num_key_value_heads": 4,  # adapters on k/v need as many KV heads as heads
    },
    "lfm2": {"block_ff_dim": 128, "block_multiple_of": 16},
}
_EXPERT_KEYS = {
    "granitemoehybrid": "num_local_experts",
    "jamba": "num_experts",
    "nemotron_h": "n_routed_experts",
    "qwen3_next": "num_experts",
    "qwen3_5_moe_text": "num_experts",
}


def tiny_config(raw: dict[str, Any]) -> Any:
    """A transformers config with ``raw``'s structure and tiny widths.

    Raises:
        ValueError: the family is not one the engine runs.
    """
    from transformers import AutoConfig

    if isinstance(raw.get("text_config"), dict):  # a multimodal checkpoint: its text model
        raw = {"model_type": f"{raw.get('model_type')}_text", **raw["text_config"]}
    model_type = raw.get("model_type")
    if model_type not in supported_families():
        raise ValueError(
            f"model type {model_type!r} has no engine implementation; "
            f"supported: {', '.join(supported_families())}"
        )
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_") and k != "model_type"}
    kwargs.pop("head_dim", None)
    kwargs.update(_COMMON)
    kwargs.update(_FAMILY[model_type])
    experts_key = _EXPERT_KEYS.get(model_type)
    if experts_key and int(kwargs.get(experts_key) or 0) > 0:
        kwargs[experts_key] = 4
        kwargs["num_experts_per_tok"] = min(2, int(kwargs.get("num_experts_per_tok") or 2))
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def init_random_weights(model: HybridModel, seed: int = 0, std: float = 0.02) -> None:
    """Initialise every parameter as transformers would (normal matrices, unit norms,
    Mamba's ``A = -1 .. -n``, ``D = 1``, ``dt_bias = 1``, uniform conv taps), in place
    on the parameters' device from a seeded generator (benchmarks build billions of
    parameters directly on the GPU this way)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            steps = torch.arange(1, param.shape[-1] + 1, device=param.device, dtype=torch.float32)
            param.copy_(torch.log(steps).expand_as(param))
        elif leaf in ("D", "dt_bias") or (leaf == "weight" and "norm" in name):
            param.fill_(1.0)
        elif leaf == "bias":
            param.zero_()
        elif "conv1d" in name:
            bound = 1.0 / math.sqrt(param.shape[-1])
            param.uniform_(-bound, bound, generator=generator)
        else:
            param.normal_(0.0, std, generator=generator)
    model.tie_weights_if_needed()


def tiny_model(raw: dict[str, Any], seed: int = 0) -> HybridModel:
    """A random-weight engine model with ``raw``'s structure (see `tiny_config`)."""
    config = tiny_config(raw)
    model = model_class(config.model_type)(config)
    init_random_weights(model, seed)
    return model.eval()
