"""The engine's own forward passes, one module per family, keyed by transformers'
``model_type``."""

from __future__ import annotations

import importlib

from avmp.engine.models.base import HybridModel

# model_type -> (module, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridModel"),
    "bamba": ("bamba", "BambaModel"),
    "nemotron_h": ("nemotron_h", "NemotronHModel"),
    "jamba": ("jamba", "JambaModel"),
    "falcon_h1": ("falcon_h1", "FalconH1Model"),
    "qwen3_next": ("qwen3_next", "Qwen3NextModel"),
    "qwen3_5": ("qwen3_next", "Qwen35Model"),
    "qwen3_5_text": ("qwen3_next", "Qwen35Model"),
    "qwen3_5_moe": ("qwen3_next", "Qwen35MoeModel"),
    "qwen3_5_moe_text": ("qwen3_next", "Qwen35MoeModel"),
    "zamba2": ("zamba2", "Zamba2Model"),
    "lfm2": ("lfm2", "Lfm2Model"),
    "minimax": ("minimax", "MiniMaxModel"),
}


def supported_families() -> list[str]:
    """Model types whose module is present in this checkout."""
    found = []
    for model_type, (module, _) in FAMILIES.items():
        if importlib.util.find_spec(f"avmp.engine.models.{module}") is not None:
            found.append(model_type)
    return found


def model_class(model_type: str) -> type[HybridModel]:
    """The engine's model class for a transformers ``model_type``.

    Raises:
        ValueError: the family is not supported.
    """
    if model_type not in supported_families():
        raise ValueError(
            f"model type {model_type!r} is not supported by the engine; "
            f"supported: {', '.join(supported_families())}"
        )
    module, name = FAMILIES[model_type]
    cls: type[HybridModel] = getattr(importlib.import_module(f"avmp.engine.models.{module}"), name)
    return cls
