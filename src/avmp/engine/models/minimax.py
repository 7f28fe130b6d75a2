"""MiniMax-Text-01: lightning (linear) attention on most layers, softmax attention on
the others, a top-k mixture of experts in every layer.

The blocks are post-norm style: the stream is normalised first, and that normalised
value is the residual (``norm(x) * alpha + f(norm(x)) * beta``), for attention and MoE
alike. A lightning layer's per-request state is one ``[head_dim, head_dim]`` matrix per
head and no conv (see `avmp.kernels.lightning`), so its slot entry holds that matrix
alone (`LayerKind.LIGHTNING`), transposed, as the Mamba2 kernels that run it on the GPU
read a state (`avmp.engine.triton_lightning`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.experts import ExpertLayout, gated_hidden
from avmp.engine.models.base import TORCH_DTYPE_NAMES, HybridModel
from avmp.engine.models.layers import (
    GatedMLP,
    OpsLayer,
    PagedAttention,
    RMSNorm,
    Rope,
    Rotary,
    activation,
    head_dim_of,
    local_experts,
    rope_theta,
    shard_param,
)
from avmp.engine.ops import Ops
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import NormSpan, column_linear, embedding, lm_head, row_linear
from avmp.engine.parallel.shards import Rows
from avmp.kernels import lightning
from avmp.models.geometry import CacheTensor, ConvColumns, LayerKind, ModelGeometry, RecurrentLayer


class LightningAttention(OpsLayer):
    """``out_proj(sigmoid(output_gate(x)) * norm(lightning(act(qkv_proj(x)))))``.

    Under tensor parallelism each rank holds ``heads / size`` heads (their q, k, v, gate
    rows, decay rates and states); the norm spans every head, so its sum of squares is
    all-reduced, and ``out_proj`` is row-parallel.
    """

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_index = layer_index
        heads, self.head_dim = config.num_attention_heads, head_dim_of(config)
        first, self.num_heads = tp.split(heads, "lightning heads")
        self.block_size = config.block_size
        width = self.num_heads * self.head_dim
        rows = Rows.units(first, self.num_heads, self.head_dim, heads)
        self.qkv_proj = column_linear(config.hidden_size,
                                      Rows.units(first, self.num_heads, 3 * self.head_dim, heads),
                                      False, tp)  # fmt: skip
        self.output_gate = column_linear(config.hidden_size, rows, False, tp)
        self.out_proj = row_linear(rows, config.hidden_size, False, tp)
        self.norm = RMSNorm(width, 1e-6)  # transformers gives this norm its default eps
        self.norm_span = NormSpan.of(tp, first * self.head_dim, rows.full, rows.full)
        shard_param(self.norm.weight, rows, tp)
        self.act = activation(config.hidden_act)
        slope = lightning.slope_rates(heads, layer_index, config.num_hidden_layers)
        self.slope_rate: torch.Tensor
        self.register_buffer("slope_rate", slope[first : first + self.num_heads], persistent=False)

    @property
    def ssm_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.head_dim, self.head_dim)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        qkv = self.ops.activation(self.act, self.qkv_proj(x))
        _, states = cache.state(self.layer_index)
        y = self.ops.lightning_mix(self, qkv, states, batch)  # [T, H * D]
        if self.norm_span is None:
            y = self.norm(y)
        else:
            normed = self.norm_span.rms_norm(y, self.norm.variance_epsilon)
            y = self.norm.weight * normed.to(y.dtype)
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * y)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[T, H, D]`` (each head's q, k and v lie side by side)."""
        q, k, v = qkv.view(-1, self.num_heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        return q, k, v

    def prefill(
        self, qkv: torch.Tensor, _: torch.Tensor, __: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's chunk from (and into) its state (`run_recurrent`'s step)."""
        q, k, v = self.split(qkv)
        y = lightning.lightning_prefill(q, k, v, self.slope_rate, state, self.block_size)
        return y.reshape(qkv.shape[0], -1)

    def decode(
        self,
        qkv: torch.Tensor,
        _: torch.Tensor,
        __: torch.Tensor,
        states: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of N sequences."""
        q, k, v = self.split(qkv)
        y = lightning.lightning_step(states, slots, q, k, v, self.slope_rate)
        return y.reshape(qkv.shape[0], -1)


class MiniMaxExpert(GatedMLP):
    """``w2(act(w1(x)) * w3(x))``: a gated MLP under the checkpoints' expert names."""

    def __init__(self, config: Any) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.w1, self.w3, self.w2 = self.gate_proj, self.up_proj, self.down_proj
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w2(self.glu(self.w1(x), self.w3(x)))
        return out


# the stacked layout of MiniMaxExpert (avmp.engine.experts): w1 (gate) and w3 (up) stack
MINIMAX_EXPERT = ExpertLayout(("w1", "w3"), "w2", gated_hidden)


class MiniMaxMoE(nn.Module):
    """Softmax router, top-k renormalised, experts summed in index order; under tensor
    parallelism each rank runs its share of the experts and one all-reduce adds them."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = local_experts(
            lambda: MiniMaxExpert(config), config.num_local_experts, tp, MINIMAX_EXPERT
        )
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, index, weights)
        return self.tp.all_reduce(out.to(x.dtype))


class MiniMaxBlock(nn.Module):
    """``h = norm(x); x = h * a + mix(h) * b`` then the same with the MoE."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.block_sparse_moe = MiniMaxMoE(config, tp)
        self.mlp_factors = (config.mlp_alpha_factor, config.mlp_beta_factor)
        kind = config.layer_types[layer_index]
        self.self_attn: LightningAttention | PagedAttention
        if kind == "linear_attention":
            self.self_attn = LightningAttention(config, layer_index, tp)
            self.attn_factors = (config.linear_attn_alpha_factor, config.linear_attn_beta_factor)
        elif kind == "full_attention":
            head_dim = head_dim_of(config)
            self.self_attn = PagedAttention(
                layer_index,
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                head_dim,
                scale=head_dim**-0.5,
                tp=tp,
            )
            self.attn_factors = (config.full_attn_alpha_factor, config.full_attn_beta_factor)
        else:
            raise ValueError(f"unknown MiniMax layer type {kind!r} at layer {layer_index}")

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches, rope: Rope
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if isinstance(self.self_attn, LightningAttention):
            mixed = self.self_attn(h, batch, cache)
        else:
            mixed = self.self_attn(h, batch, cache, rope)
        alpha, beta = self.attn_factors
        h = self.post_attention_layernorm(h * alpha + mixed * beta)
        alpha, beta = self.mlp_factors
        out: torch.Tensor = h * alpha + self.block_sparse_moe(h) * beta
        return out


class MiniMaxBody(nn.Module):
    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            MiniMaxBlock(config, i, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniMaxModel(HybridModel):
    family = "minimax"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers saves the lightning layers' decay tables; they follow from the config
    computed_buffers = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        params = getattr(config, "rope_parameters", None) or {}
        if params.get("rope_type") not in (None, "default"):
            raise ValueError(f"MiniMax with rope type {params['rope_type']!r} is not supported")
        self.model = MiniMaxBody(config, tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        partial = params.get("partial_rotary_factor", 1.0)
        self.rotary = Rotary(head_dim_of(config), rope_theta(config), partial)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, batch, cache, rope)
        out: torch.Tensor = self.model.norm(x)
        return out

    def can_capture_decode(self) -> bool:
        """Where every shape of a decode step follows from the batch size: the lightning
        layers' ops replace the reference core, whose decode batch is built per step
        (`TritonOps` runs it on device indices, `avmp.engine.triton_lightning`), and
        the experts take the grouped path on its fast kernel (bf16 on an H100/H200-class
        GPU), where the loop's routing has data-dependent shapes (`avmp.engine.experts`)."""
        lightning = [m for m in self.modules() if isinstance(m, LightningAttention)]
        moe = [m for m in self.modules() if isinstance(m, MiniMaxMoE)]
        on_device = all(type(m.ops).lightning_mix is not Ops.lightning_mix for m in lightning)
        return on_device and all(m.experts.is_capturable() for m in moe)

    def can_capture_mixed(self) -> bool:
        """Prefill and mixed steps read no host value where decode steps do not: the
        lightning layers' prefill runs the chunked and varlen scans over device tables
        (`avmp.engine.triton_lightning`), attention and the grouped experts as decode."""
        return self.can_capture_decode()

    def geometry(
        self,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype | None = None,
        conv_columns: ConvColumns = ConvColumns.VLLM,
    ) -> ModelGeometry:
        """Softmax attention as every family's; each lightning layer one matrix state
        per head in the state dtype, and no conv."""
        geometry = super().geometry(dtype, ssm_dtype, conv_columns)
        state_name = TORCH_DTYPE_NAMES[ssm_dtype or dtype]
        recurrent = tuple(
            RecurrentLayer(
                m.layer_index, LayerKind.LIGHTNING, CacheTensor("kv_state", m.ssm_shape, state_name)
            )
            for m in self.modules()
            if isinstance(m, LightningAttention)
        )
        return dataclasses.replace(geometry, recurrent_layers=recurrent)
