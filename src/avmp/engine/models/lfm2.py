"""LFM2: gated short convolutions and grouped-query attention (q/k norms per head), each
block followed by a SwiGLU MLP.

A short convolution computes ``C * conv(B * x)`` with ``B, C, x`` from one projection:
a depthwise causal conv of ``conv_L_cache`` taps, no activation, no SSM. Its whole
per-request state is the conv window (``hidden`` channels), so its slot entry holds a
conv state and nothing else (`LayerKind.SHORT_CONV`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.base import TORCH_DTYPE_NAMES, HybridModel
from avmp.engine.models.layers import (
    GatedMLP,
    HybridBody,
    OpsLayer,
    PagedAttention,
    Residual,
    RMSNorm,
    Rope,
    Rotary,
    apply_rotary,
    depthwise_conv,
    head_dim_of,
    rope_theta,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import column_linear, lm_head, row_linear
from avmp.engine.parallel.shards import Rows
from avmp.kernels import reference as ref
from avmp.models.geometry import (
    CacheTensor,
    ConvColumns,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)


class Lfm2ShortConv(OpsLayer):
    """``out_proj(C * conv(B * x))``, the conv continuing from the request's slot.
    Under tensor parallelism each rank holds ``hidden / size`` channels of B, C, x and
    the conv; ``out_proj`` is row-parallel."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, taps, bias = config.hidden_size, config.conv_L_cache, config.conv_bias
        channels = Rows.units(*tp.split(h, "short conv channels"), 1, h)
        self.layer_index, self.conv_dim, self.d_conv = layer_index, channels.size, taps
        self.conv = depthwise_conv(channels, taps, bias, tp)
        self.in_proj = column_linear(h, Rows.sections([channels] * 3), bias, tp)
        self.out_proj = row_linear(channels, h, bias, tp)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        b, c, xs = self.in_proj(x).chunk(3, dim=-1)
        conv_states, _ = cache.state(self.layer_index)
        y = self.ops.short_conv_mix(self, b * xs, conv_states, batch)
        return self.out_proj(c * y)

    def prefill(
        self, bx: torch.Tensor, _: torch.Tensor, conv: torch.Tensor, __: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's chunk from (and into) its conv state (`run_recurrent`'s step)."""
        return ref.causal_conv1d(bx, conv, self.conv.weight.squeeze(1), self.conv.bias, None)

    def decode(
        self,
        bx: torch.Tensor,
        _: torch.Tensor,
        conv_states: torch.Tensor,
        __: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of N sequences."""
        weight = self.conv.weight.squeeze(1)
        return ref.causal_conv1d_step(bx, conv_states, slots, weight, self.conv.bias, None)


class Lfm2Attention(PagedAttention):
    """Grouped-query attention with per-head RMS norms on q and k before the rotary;
    the output projection is named ``out_proj``."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        head_dim = head_dim_of(config)
        super().__init__(
            layer_index,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            scale=head_dim**-0.5,
            tp=tp,
        )
        self.out_proj = self.o_proj
        del self.o_proj
        self.q_layernorm = RMSNorm(head_dim, config.norm_eps)
        self.k_layernorm = RMSNorm(head_dim, config.norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches, rope: Rope
    ) -> torch.Tensor:
        q = self.q_layernorm(self.q_proj(x).view(-1, self.num_heads, self.head_dim))
        k = self.k_layernorm(self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out: torch.Tensor = self.out_proj(
            self.attend(q, k, v, batch, cache).reshape(x.shape[0], -1)
        )
        return out


def lfm2_mlp_width(config: Any) -> int:
    """The SwiGLU width: with ``block_auto_adjust_ff_dim``, two thirds of
    ``intermediate_size``, times the multiplier, rounded up to ``block_multiple_of``."""
    width = int(config.intermediate_size)
    if not config.block_auto_adjust_ff_dim:
        return width
    width = int(2 * width / 3)
    if config.block_ffn_dim_multiplier is None:
        return width
    multiple = int(config.block_multiple_of)
    width = int(config.block_ffn_dim_multiplier * width)
    return multiple * ((width + multiple - 1) // multiple)


class Lfm2MLP(GatedMLP):
    """``w2(silu(w1(x)) * w3(x))``: a gated MLP under LFM2's names."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config.hidden_size, lfm2_mlp_width(config), "silu", tp=tp)
        self.w1, self.w3, self.w2 = self.gate_proj, self.up_proj, self.down_proj
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w2(self.glu(self.w1(x), self.w3(x)))
        return out


class Lfm2Block(nn.Module):
    """``x + op(operator_norm(x))`` then ``x + feed_forward(ffn_norm(x))``."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.feed_forward = Lfm2MLP(config, tp)
        kind = config.layer_types[layer_index]
        self.conv: Lfm2ShortConv | None = None
        self.self_attn: Lfm2Attention | None = None
        if kind == "conv":
            self.conv = Lfm2ShortConv(config, layer_index, tp)
        elif kind == "full_attention":
            self.self_attn = Lfm2Attention(config, layer_index, tp)
        else:
            raise ValueError(f"unknown LFM2 layer type {kind!r} at layer {layer_index}")

    def forward(self, x: Residual, batch: StepBatch, cache: LayerCaches, rope: Rope) -> None:
        h = x.norm(self.operator_norm)
        if self.conv is not None:
            x.add(self.conv(h, batch, cache))
        else:
            assert self.self_attn is not None
            x.add(self.self_attn(h, batch, cache, rope))
        x.add(self.feed_forward(x.norm(self.ffn_norm)))


class Lfm2Model(HybridModel):
    family = "lfm2"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
        if rope_type not in (None, "default"):
            raise ValueError(f"LFM2 with rope type {rope_type!r} is not supported")
        # the final norm is named embedding_norm in LFM2 checkpoints
        self.model = HybridBody(config, Lfm2Block, config.norm_eps, norm_name="embedding_norm",
                                tp=tp)  # fmt: skip
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        self.rotary = Rotary(head_dim_of(config), rope_theta(config))

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed(input_ids)
        return self.model.run(x, batch, cache, self.rotary.cos_sin(batch.positions, x.dtype))

    def can_capture_mixed(self) -> bool:
        """Yes: its short convolutions (one varlen conv launch) and attention layers'
        prefill paths read device arrays alone."""
        return True

    def geometry(
        self,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype | None = None,
        conv_columns: ConvColumns = ConvColumns.VLLM,
    ) -> ModelGeometry:
        """Attention as every family's; each short convolution a conv state alone."""
        geometry = super().geometry(dtype, ssm_dtype, conv_columns)
        conv_name = TORCH_DTYPE_NAMES[dtype]
        recurrent = tuple(
            RecurrentLayer(
                m.layer_index,
                LayerKind.SHORT_CONV,
                ssm=None,
                conv=CacheTensor("conv", (m.conv_dim, conv_columns.columns(m.d_conv)), conv_name),
            )
            for m in self.modules()
            if isinstance(m, Lfm2ShortConv)
        )
        return dataclasses.replace(geometry, recurrent_layers=recurrent)
