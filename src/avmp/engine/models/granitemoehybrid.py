"""GraniteMoeHybrid (Granite-4.0-H): Mamba2 and attention blocks, each followed by a
shared MLP plus an optional top-k mixture of experts, with Granite's multipliers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.experts import RoutedExperts, can_group, grouped_experts, run_experts
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
    Rotary,
    act_mlp,
    activation,
    head_dim_of,
    mix_or_attend,
    rope_theta,
    shard_param,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import column_linear, lm_head, row_linear
from avmp.engine.parallel.shards import Rows


def mamba2_settings(config: Any) -> dict[str, Any]:
    """`Mamba2Mixer` keyword arguments from the ``mamba_*`` fields that Granite-H, Bamba
    and Falcon-H1 configs share (one place, so the three read them alike)."""
    return {
        "num_heads": config.mamba_n_heads,
        "head_dim": int(config.mamba_d_head),
        "n_groups": config.mamba_n_groups,
        "d_state": config.mamba_d_state,
        "d_conv": config.mamba_d_conv,
        "chunk_size": config.mamba_chunk_size,
        "eps": config.rms_norm_eps,
        "conv_bias": config.mamba_conv_bias,
        "proj_bias": config.mamba_proj_bias,
        "time_step_limit": tuple(config.time_step_limit or (0.0, float("inf"))),
    }


def mamba2_from_granite_style(
    config: Any, layer_index: int, tp: TensorParallel = SINGLE
) -> Mamba2Mixer:
    """A Mamba2 mixer from the ``mamba_*`` fields shared by Granite-H and Bamba configs."""
    return Mamba2Mixer(layer_index, config.hidden_size, **mamba2_settings(config), tp=tp)


class GraniteSharedMLP(OpsLayer):
    """``output_linear(act(a) * b)`` with ``a, b`` the two halves of ``input_linear``;
    under tensor parallelism each half column-parallel, ``output_linear`` row-parallel
    (its partial sum reduced by the block, with the experts')."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE, reduce: bool = True) -> None:
        super().__init__()
        width = config.shared_intermediate_size
        rows = Rows.units(*tp.split(width, "shared MLP width"), 1, width)
        self.input_linear = column_linear(
            config.hidden_size, Rows.sections([rows, rows]), False, tp
        )
        self.output_linear = row_linear(rows, config.hidden_size, False, tp, reduce)
        self.act = activation(config.hidden_act)
        self.residual_out = False  # see `Mamba2Mixer.residual_out`

    def forward(self, x: Normed) -> Any:
        return act_mlp(self, self.act, x, self.input_linear, self.output_linear, gated=True,
                       residual=self.residual_out)  # fmt: skip


class ExpertWeights(nn.Module):
    """Stacked expert matrices ``[num_experts, out, in]`` under one ``weight``."""

    def __init__(self, num_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class GraniteRouter(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.layer = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.layer(x).float()
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1).type_as(x), top_index


class GraniteMoE(OpsLayer, RoutedExperts):
    """Top-k experts in the checkpoint layout: ``input_linear`` holds gate and up, stacked
    (so the grouped path of `avmp.engine.experts` runs on them as they are). Under
    tensor parallelism a rank holds a consecutive share of the experts (the stacks'
    first dimension) and returns its part of the sum."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        n, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.first_expert, self.num_experts = tp.split(n, "experts")
        experts = Rows.units(self.first_expert, self.num_experts, 1, n)
        self.router = GraniteRouter(config)
        self.input_linear = ExpertWeights(self.num_experts, 2 * i, h)
        self.output_linear = ExpertWeights(self.num_experts, h, i)
        shard_param(self.input_linear.weight, experts, tp)
        shard_param(self.output_linear.weight, experts, tp)
        self.act = activation(config.hidden_act)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(nn.functional.linear(x, self.input_linear.weight[index]))
        return nn.functional.linear(hidden, self.output_linear.weight[index])

    def hidden(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.ops.activation(self.act, gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.router(x)
        up, down = self.input_linear.weight, self.output_linear.weight
        if self.takes_grouped_path(x, up, down):
            out = grouped_experts(x, index, weights, up, down, self.hidden, self.first_expert)
        else:
            out = run_experts(x, index, weights, self.expert, self.num_experts,
                              self.first_expert)  # fmt: skip
        return out.to(x.dtype)


class GraniteBlock(nn.Module):
    """Token mixer then shared MLP plus experts, each added with the residual
    multiplier; under tensor parallelism the MLP's and the experts' partial sums are
    added before one all-reduce."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.block_sparse_moe = GraniteMoE(config, tp) if config.num_local_experts > 0 else None
        self.shared_mlp = GraniteSharedMLP(config, tp, reduce=False)
        self.tp = tp
        self.residual_multiplier = config.residual_multiplier
        self.mamba: Mamba2Mixer | None = None
        self.self_attn: PagedAttention | None = None
        if config.layer_types[layer_index] == "full_attention":
            head_dim = head_dim_of(config)
            self.self_attn = PagedAttention(
                layer_index,
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                head_dim,
                scale=config.attention_multiplier,
                bias=config.attention_bias,
                tp=tp,
            )
            self.self_attn.residual_out = True  # added to the stream as it is
        else:
            self.mamba = mamba2_from_granite_style(config, layer_index, tp)
            self.mamba.residual_out = True  # added to the stream as it is
        # the MLP's output joins the stream as it is unless the experts' or the other
        # ranks' sums are added to it first
        self.shared_mlp.residual_out = self.block_sparse_moe is None and tp.is_single

    def forward(self, x: Residual, batch: StepBatch, cache: LayerCaches, rope: Rope) -> None:
        h = x.normed(self.input_layernorm)
        x.add(
            mix_or_attend(self.mamba, self.self_attn, h, batch, cache, rope),
            self.residual_multiplier,
        )
        h = x.normed(self.post_attention_layernorm)
        ffn = self.shared_mlp(h)
        if self.block_sparse_moe is not None:
            ffn = self.block_sparse_moe(h.value()) + ffn
        x.add(self.tp.all_reduce(ffn), self.residual_multiplier)


class GraniteMoeHybridModel(HybridModel):
    family = "granitemoehybrid"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = HybridBody(config, GraniteBlock, config.rms_norm_eps, norm_name="norm",
                                tp=tp)  # fmt: skip
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        self.rotary: Rotary | None = None
        if config.position_embedding_type == "rope":
            head_dim = head_dim_of(config)
            self.rotary = Rotary(head_dim, rope_theta(config))

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed(input_ids) * self.config.embedding_multiplier
        rope = None if self.rotary is None else self.rotary.cos_sin(batch.positions, x.dtype)
        return self.model.run(x, batch, cache, rope)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.lm_head(hidden) / self.config.logits_scaling).float()

    def can_capture_decode(self) -> bool:
        """Without experts, or with experts only where they take the grouped path on
        its fast kernel (bf16 on an H100/H200-class GPU): every shape then follows from
        the batch size, where the loop's routing has data-dependent shapes."""
        moe = [m for m in self.modules() if isinstance(m, GraniteMoE)]
        return all(
            m.grouped is not False
            and can_group(m.input_linear.weight, m.input_linear.weight, m.output_linear.weight)
            for m in moe
        )

    def can_capture_mixed(self) -> bool:
        """As decode: its Mamba2 and attention prefill paths read device arrays alone
        (and its experts' grouped path, where they take it, every row of the step)."""
        return self.can_capture_decode()
