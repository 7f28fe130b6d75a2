"""Falcon-H1: every block runs attention and a Mamba2 mixer side by side on the same
normed input and adds their outputs, with muP multipliers throughout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.base import HybridModel
from avmp.engine.models.granitemoehybrid import mamba2_settings
from avmp.engine.models.layers import (
    HybridBody,
    Mamba2Mixer,
    OpsLayer,
    PagedAttention,
    Residual,
    RMSNorm,
    Rotary,
    activation,
    apply_rotary,
    head_dim_of,
    rope_theta,
    shard_param,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import NormSpan, column_linear, lm_head, row_linear
from avmp.engine.parallel.shards import Rows


def mup_vector(config: Any, intermediate: int) -> torch.Tensor:
    """Per-channel multipliers of the in_proj output (z, x, B, C, dt sections)."""
    gs = config.mamba_n_groups * config.mamba_d_state
    sizes = [intermediate, intermediate, gs, gs, config.mamba_n_heads]
    parts = [torch.full((n,), float(m)) for n, m in zip(sizes, config.ssm_multipliers, strict=True)]
    return torch.cat(parts)


class FalconGatedNorm(nn.Module):
    """Grouped RMS norm with the gate applied before or after it. With a ``span`` this
    rank holds part of one group, and the group's sum of squares is all-reduced."""

    def __init__(
        self,
        size: int,
        n_groups: int,
        eps: float,
        norm_before_gate: bool,
        span: NormSpan | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.n_groups, self.eps, self.norm_before_gate = n_groups, eps, norm_before_gate
        self.span = span

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if not self.norm_before_gate:
            x = x * F.silu(gate.float())
        if self.span is None:
            h = x.float().view(x.shape[0], self.n_groups, -1)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            h = (self.weight.view(self.n_groups, -1) * h).view(x.shape)
        else:
            h = self.weight * self.span.rms_norm(x, self.eps)
        if self.norm_before_gate:
            h = h * F.silu(gate.float())
        return h.to(dtype)


class FalconMixer(Mamba2Mixer):
    """Mamba2 with muP input/in_proj multipliers and an optional gated norm. Under
    tensor parallelism its output is a partial sum, which the block adds to the
    attention's before one all-reduce."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        intermediate = config.mamba_d_ssm or int(config.mamba_expand * config.hidden_size)
        super().__init__(layer_index, config.hidden_size, **mamba2_settings(config), tp=tp,
                         reduce=False)  # fmt: skip
        if self.channel_rows.full != intermediate:
            raise ValueError("Falcon-H1: mamba_n_heads * mamba_d_head must equal mamba_d_ssm")
        self.out_proj = row_linear(self.channel_rows, config.hidden_size,
                                   config.projectors_bias, tp, reduce=False)  # fmt: skip
        # Falcon-H1's own gated norm (or none) in place of Mamba2Mixer's; the checkpoint
        # names it ``norm`` too
        self.norm: FalconGatedNorm | None = None  # type: ignore[assignment]
        if config.mamba_rms_norm:
            group = intermediate // config.mamba_n_groups
            first_channel = self.channel_rows.ranges[0][0]
            self.norm = FalconGatedNorm(
                self.intermediate_size,
                self.n_groups,
                config.rms_norm_eps,
                config.mamba_norm_before_gate,
                NormSpan.of(tp, first_channel, intermediate, group),
            )
            shard_param(self.norm.weight, self.channel_rows, tp)
        self.ssm_in_multiplier = config.ssm_in_multiplier
        mup = mup_vector(config, intermediate)
        if not tp.is_single:
            mup = mup[self.in_proj_rows.index()]
        self.register_buffer("mup_vector", mup, persistent=False)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        proj = self.in_proj(x * self.ssm_in_multiplier) * self.mup_vector
        gate, xbc, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        y = self.mix(xbc, dt, batch, cache)
        y = y * F.silu(gate) if self.norm is None else self.norm(y, gate)
        return self.out_proj(y.to(x.dtype))


class FalconAttention(PagedAttention):
    """Attention whose keys are scaled by ``key_multiplier`` before rotary; under tensor
    parallelism its output is a partial sum (the block reduces it with the mixer's)."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        head_dim = head_dim_of(config)
        super().__init__(
            layer_index,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            scale=head_dim**-0.5,
            bias=config.attention_bias,
            tp=tp,
            reduce=False,
        )
        self.key_multiplier = config.key_multiplier

    def forward(
        self,
        x: torch.Tensor,
        batch: StepBatch,
        cache: LayerCaches,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        assert rope is not None
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim) * self.key_multiplier
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.o_proj(self.attend(q, k, v, batch, cache).reshape(x.shape[0], -1))


class FalconMLP(OpsLayer):
    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        rows = Rows.units(*tp.split(i, "MLP width"), 1, i)
        self.gate_proj = column_linear(h, rows, bias, tp)
        self.up_proj = column_linear(h, rows, bias, tp)
        self.down_proj = row_linear(rows, h, bias, tp)
        self.act = activation(config.hidden_act)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up_proj(x) * self.ops.activation(
            self.act, self.gate_proj(x) * self.gate_multiplier
        )
        return self.down_proj(y) * self.down_multiplier


class FalconBlock(nn.Module):
    """Attention and Mamba2 side by side on one normed input; under tensor parallelism
    their partial sums are added before one all-reduce."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = FalconMixer(config, layer_index, tp)
        self.self_attn = FalconAttention(config, layer_index, tp)
        self.feed_forward = FalconMLP(config, tp)
        self.tp = tp
        self.attention_in_multiplier = config.attention_in_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attn_out_multiplier = config.attention_out_multiplier

    def forward(
        self,
        x: Residual,
        batch: StepBatch,
        cache: LayerCaches,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        h = x.norm(self.input_layernorm)
        ssm = self.mamba(h, batch, cache) * self.ssm_out_multiplier
        attn = self.self_attn(h * self.attention_in_multiplier, batch, cache, rope)
        x.add(self.tp.all_reduce(ssm + attn * self.attn_out_multiplier))
        x.add(self.feed_forward(x.norm(self.pre_ff_layernorm)))


class FalconH1Model(HybridModel):
    family = "falcon_h1"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = HybridBody(config, FalconBlock, config.rms_norm_eps, tp=tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        head_dim = head_dim_of(config)
        self.rotary = Rotary(head_dim, rope_theta(config))

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed(input_ids) * self.config.embedding_multiplier
        return self.model.run(x, batch, cache, self.rotary.cos_sin(batch.positions, x.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.lm_head(hidden) * self.config.lm_head_multiplier).float()

    def can_capture_mixed(self) -> bool:
        """Yes: its Mamba2 and attention layers' prefill paths read device arrays alone."""
        return True
