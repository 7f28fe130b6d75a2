"""Our parameter estimates against transformers' own count.

Every zoo model with a transformers class is built on the ``meta`` device (no memory,
no weights) and its parameters counted; routed-expert tensors count as active in the
proportion top-k / experts.
"""

from __future__ import annotations

from typing import Any

import pytest

from avmp.models import resolve_model, zoo_config, zoo_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Zamba2's LoRA adapters on the shared blocks are left out of our estimate.
TOLERANCE = 0.02


def _transformers_config(name: str) -> tuple[str, dict[str, Any]]:
    """The zoo config in the form transformers' config classes take."""
    config = {k: v for k, v in zoo_config(name).items() if not k.startswith("_")}
    if "ssm_cfg" in config:  # a mamba_ssm checkpoint: express it as Mamba2Config
        hidden = config["d_model"]
        multiple = config["pad_vocab_size_multiple"]
        return "mamba2", {
            "hidden_size": hidden,
            "num_hidden_layers": config["n_layer"],
            "num_heads": 2 * hidden // 64,
            "head_dim": 64,
            "state_size": 128,
            "n_groups": 1,
            "vocab_size": -(-config["vocab_size"] // multiple) * multiple,
            "tie_word_embeddings": config["tie_embeddings"],
        }
    model_type = config.pop("model_type")
    if model_type == "minimax_text_01":  # the original remote-code spelling
        codes = config.pop("attn_type_list")
        config["layer_types"] = ["full_attention" if c else "linear_attention" for c in codes]
        model_type = "minimax"
    return model_type, config


def _experts(config: Any) -> tuple[int, int]:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key)), int(config.num_experts_per_tok)
    return 0, 0


def _count(name: str) -> tuple[int, float]:
    model_type, kwargs = _transformers_config(name)
    config = transformers.CONFIG_MAPPING[model_type](**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    experts, top_k = _experts(config)
    total, active = 0, 0.0
    for param_name, param in model.named_parameters():
        total += param.numel()
        routed = ".experts." in param_name and experts
        active += param.numel() * (top_k / experts if routed else 1.0)
    return total, active


@pytest.mark.parametrize("name", zoo_names())
def test_param_estimate_matches_transformers(name: str) -> None:
    total, active = _count(name)
    geometry = resolve_model(name)
    assert geometry.num_params == pytest.approx(total, rel=TOLERANCE)
    assert geometry.num_active_params == pytest.approx(active, rel=TOLERANCE)
