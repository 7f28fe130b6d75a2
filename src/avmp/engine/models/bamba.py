"""Bamba: Mamba2 blocks with a few attention blocks (partial rotary), each followed by a
gated MLP."""

from __future__ import annotations

from typing import Any

import torch

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.base import HybridModel
from avmp.engine.models.granitemoehybrid import mamba2_from_granite_style
from avmp.engine.models.layers import (
    GatedMLP,
    HybridBody,
    Mamba2Mixer,
    MixerOrAttentionBlock,
    PagedAttention,
    RMSNorm,
    Rotary,
    head_dim_of,
    rope_theta,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import lm_head


class BambaBlock(MixerOrAttentionBlock):
    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps)
        self.feed_forward = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, tp
        )
        self.mamba: Mamba2Mixer | None = None
        self.self_attn: PagedAttention | None = None
        if config.layers_block_type[layer_index] == "full_attention":
            head_dim = head_dim_of(config)
            self.self_attn = PagedAttention(
                layer_index,
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                head_dim,
                scale=head_dim**-0.5,
                bias=config.attention_bias,
                tp=tp,
            )
        else:
            self.mamba = mamba2_from_granite_style(config, layer_index, tp)


class BambaModel(HybridModel):
    family = "bamba"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = HybridBody(config, BambaBlock, config.rms_norm_eps, tp=tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        self.rotary = Rotary(head_dim_of(config), rope_theta(config), partial)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed(input_ids)
        return self.model.run(x, batch, cache, self.rotary.cos_sin(batch.positions, x.dtype))

    def can_capture_mixed(self) -> bool:
        """Yes: its Mamba2 and attention layers' prefill paths read device arrays alone."""
        return True
