"""Jamba: Mamba1 blocks with attention every few layers (no positional embedding), and
a softmax top-k mixture of experts on every other block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import (
    GatedMLP,
    HybridBody,
    Mamba1Mixer,
    MixerOrAttentionBlock,
    PagedAttention,
    RMSNorm,
    local_experts,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import lm_head


class JambaRouter(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(nn.functional.linear(x, self.weight), dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return weights.to(x.dtype), index


class JambaMoE(nn.Module):
    """Top-k experts, each a gated MLP, in the checkpoint's per-expert layout; under
    tensor parallelism each rank runs its share of the experts and one all-reduce
    adds the shares."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.router = JambaRouter(config)
        h, i, act = config.hidden_size, config.intermediate_size, config.hidden_act
        self.experts = local_experts(lambda: GatedMLP(h, i, act), config.num_experts, tp)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.router(x)
        out = self.experts(x, index, weights)
        return self.tp.all_reduce(out.to(x.dtype))


class JambaBlock(MixerOrAttentionBlock):
    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps)
        self.feed_forward: nn.Module
        if config.layers_num_experts[layer_index] > 1:
            self.feed_forward = JambaMoE(config, tp)
        else:
            self.feed_forward = GatedMLP(
                config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp
            )
        self.mamba: Mamba1Mixer | None = None
        self.self_attn: PagedAttention | None = None
        if config.layer_types[layer_index] == "full_attention":
            head_dim = config.hidden_size // config.num_attention_heads
            self.self_attn = PagedAttention(
                layer_index,
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                head_dim,
                scale=head_dim**-0.5,
                tp=tp,
            )
        else:
            self.mamba = Mamba1Mixer(
                layer_index,
                config.hidden_size,
                intermediate_size=config.mamba_expand * config.hidden_size,
                d_state=config.mamba_d_state,
                d_conv=config.mamba_d_conv,
                dt_rank=config.mamba_dt_rank,
                eps=eps,
                conv_bias=config.mamba_conv_bias,
                proj_bias=config.mamba_proj_bias,
                tp=tp,
            )


class JambaModel(HybridModel):
    family = "jamba"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = HybridBody(config, JambaBlock, config.rms_norm_eps, tp=tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        # No positional embedding: attention gets no rotary.
        return self.model.run(self.model.embed(input_ids), batch, cache, None)

    def can_capture_decode(self) -> bool:
        """Without expert layers: their routing has data-dependent shapes (the Mamba1
        decode step runs on device indices alone, `TritonOps.mamba1_mix`)."""
        return all(int(n) <= 1 for n in self.config.layers_num_experts)

    def can_capture_mixed(self) -> bool:
        """As decode: the Mamba1 prefill path (varlen conv, one varlen selective scan
        over every sequence) and attention read device arrays alone."""
        return self.can_capture_decode()
