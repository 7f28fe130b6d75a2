"""Nemotron-H: a pattern of single-mixer blocks (Mamba2, attention without rotary, a
squared-ReLU MLP, or a sigmoid-routed MoE with a shared expert), each pre-normed and
residual."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.experts import ExpertLayout, activation_hidden
from avmp.engine.models.base import HybridModel
from avmp.engine.models.layers import (
    HybridBody,
    Mamba2Mixer,
    Normed,
    OpsLayer,
    PagedAttention,
    Residual,
    RMSNorm,
    Rope,
    act_mlp,
    activation,
    head_dim_of,
    local_experts,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import column_linear, lm_head, row_linear
from avmp.engine.parallel.shards import Rows


class NemotronMLP(OpsLayer):
    """``down(act(up(x)))``: no gate; under tensor parallelism up is column-parallel,
    down row-parallel."""

    def __init__(
        self,
        config: Any,
        intermediate_size: int,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        rows = Rows.units(*tp.split(intermediate_size, "MLP width"), 1, intermediate_size)
        self.up_proj = column_linear(config.hidden_size, rows, config.mlp_bias, tp)
        self.down_proj = row_linear(rows, config.hidden_size, config.mlp_bias, tp, reduce)
        self.act = activation(config.mlp_hidden_act)
        self.residual_out = False  # see `Mamba2Mixer.residual_out`

    def forward(self, x: Normed) -> Any:
        return act_mlp(self, self.act, x, self.up_proj, self.down_proj, gated=False,
                       residual=self.residual_out)  # fmt: skip


class NemotronRouter(nn.Module):
    """Sigmoid scores, group-limited top-k with a score-correction bias (DeepSeek-V3 style)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_tok, config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.e_score_correction_bias: torch.Tensor
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = nn.functional.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, per_group)
            .reshape(-1, self.num_experts)
        )
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        index = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, index


class NemotronMoE(nn.Module):
    """Routed experts plus a shared expert; under tensor parallelism each rank runs its
    share of the experts and its columns of the shared one, and one all-reduce adds
    both."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        if getattr(config, "moe_latent_size", None) is not None:
            raise ValueError(
                "Nemotron-H MoE with a latent projection is not supported by the engine"
            )
        self.gate = NemotronRouter(config)
        self.experts = local_experts(
            lambda: NemotronMLP(config, config.moe_intermediate_size),
            config.n_routed_experts,
            tp,
            ExpertLayout(("up_proj",), "down_proj", activation_hidden),
        )
        self.shared_experts = NemotronMLP(
            config, config.moe_shared_expert_intermediate_size, tp, reduce=False
        )
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x)
        routed = self.experts(x, index, weights)
        return self.tp.all_reduce(routed.to(x.dtype) + self.shared_experts(x))


def build_mixer(config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> nn.Module:
    kind = config.layers_block_type[layer_index]
    if kind == "linear_attention":
        return Mamba2Mixer(
            layer_index,
            config.hidden_size,
            num_heads=config.mamba_num_heads,
            head_dim=config.mamba_head_dim,
            n_groups=config.n_groups,
            d_state=config.ssm_state_size,
            d_conv=config.conv_kernel,
            chunk_size=config.chunk_size,
            eps=config.layer_norm_epsilon,
            conv_bias=config.use_conv_bias,
            proj_bias=config.use_bias,
            time_step_limit=(config.time_step_min, float("inf")),
            tp=tp,
        )
    if kind == "full_attention":
        head_dim = head_dim_of(config)
        return PagedAttention(
            layer_index,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            scale=head_dim**-0.5,
            tp=tp,
        )
    if kind == "mlp":
        return NemotronMLP(config, config.intermediate_size, tp)
    if kind == "moe":
        return NemotronMoE(config, tp)
    raise ValueError(f"unknown Nemotron-H block type {kind!r}")


class NemotronBlock(nn.Module):
    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, fp32_weight=True)
        self.mixer = build_mixer(config, layer_index, tp)
        if isinstance(self.mixer, Mamba2Mixer | NemotronMLP | PagedAttention):  # added as is
            self.mixer.residual_out = True

    def forward(self, x: Residual, batch: StepBatch, cache: LayerCaches, rope: Rope) -> None:
        h = x.normed(self.norm)
        if isinstance(self.mixer, Mamba2Mixer):
            out = self.mixer(h, batch, cache)
        elif isinstance(self.mixer, PagedAttention):
            out = self.mixer(h, batch, cache, rope)
        else:
            out = self.mixer(h if isinstance(self.mixer, NemotronMLP) else h.value())
        x.add(out)


class NemotronHModel(HybridModel):
    family = "nemotron_h"
    tied_weights = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.backbone = HybridBody(
            config,
            NemotronBlock,
            config.layer_norm_epsilon,
            embed_name="embeddings",
            norm_name="norm_f",
            fp32_norm=True,
            tp=tp,
        )
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        # Attention without rotary: the blocks get no rope.
        return self.backbone.run(self.backbone.embed(input_ids), batch, cache, None)

    def can_capture_decode(self) -> bool:
        """Without MoE blocks: their routing has data-dependent shapes."""
        return "moe" not in self.config.layers_block_type

    def can_capture_mixed(self) -> bool:
        """As decode: its Mamba2, attention and MLP prefill paths read device arrays
        alone; MoE routing has data-dependent shapes."""
        return self.can_capture_decode()
