"""Qwen3-Next and Qwen3.5 / Qwen3.6 (text): Gated DeltaNet layers beside gated full
attention, then a dense MLP or a mixture of experts with a gated shared expert.

Qwen3-Next projects the DeltaNet inputs with two fused matrices interleaved per key head
(``in_proj_qkvz``, ``in_proj_ba``); Qwen3.5 with four plain ones (``in_proj_qkv``,
``in_proj_z``, ``in_proj_b``, ``in_proj_a``). Everything else is shared: attention whose
query projection also yields a sigmoid output gate, per-head q/k norms, partial rotary,
and RMS norms that scale by ``1 + weight``. Qwen3.5 checkpoints wrap the text model with
a vision tower (``model_type`` ``qwen3_5``, ``text_config``): the engine runs the text
model only; the loader drops the vision and multi-token-prediction tensors. Rotary
positions of a text-only prompt are the same on Qwen3.5's three M-RoPE axes, so its
rotary equals the plain one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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
    local_experts,
    rope_theta,
    shard_param,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import column_linear, lm_head, row_linear
from avmp.engine.parallel.shards import Rows
from avmp.kernels import deltanet
from avmp.kernels import reference as ref
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    ConvColumns,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)

CHUNK_SIZE = 64  # transformers' chunk length for the chunked prefill


def text_config(config: Any) -> Any:
    """The text model's config: Qwen3.5 checkpoints nest it under ``text_config``.

    Raises:
        ValueError: a multimodal Qwen3.5 config without a text model (the engine runs
            text only and has no vision tower to stand in for it).
    """
    if str(getattr(config, "model_type", "")) in ("qwen3_5", "qwen3_5_moe"):
        text = getattr(config, "text_config", None)
        if text is None:
            raise ValueError(
                f"{config.model_type} config has no text_config: the engine runs the text "
                "model only, without the vision tower"
            )
        return text
    return config


class OffsetRMSNorm(RMSNorm):
    """Qwen3-Next's RMS norm: scales by ``1 + weight`` (zero-initialised), in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__(size, eps, fp32_weight=True)
        nn.init.zeros_(self.weight)

    def scale(self) -> torch.Tensor:
        return 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.scale(), self.variance_epsilon, True)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.add_rms_norm(x, delta, scale, self.scale(), self.variance_epsilon, True)


class GatedHeadNorm(nn.Module):
    """RMS norm of each value head's output, then ``* silu(z)`` (norm before gate)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(OpsLayer):
    """The Gated DeltaNet mixer: projections, causal conv over q, k and v, the gated
    delta rule from and into the request's slot, a gated per-head norm, out_proj.

    Its slot holds the conv state ``[2 Hk dk + Hv dv, columns]`` and the recurrent
    state ``[Hv, dk, dv]``. Under tensor parallelism each rank holds ``Hk / size`` key
    heads and the ``Hv / size`` value heads they serve (both must divide, as in vLLM and
    `avmp.models.tensor_parallel`); the norm is per head, ``out_proj`` row-parallel.
    """

    def __init__(
        self,
        config: Any,
        layer_index: int,
        fused_projections: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        num_k_heads, num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        if num_v_heads % num_k_heads:
            raise ValueError(
                f"linear_num_value_heads {num_v_heads} is not a multiple of "
                f"linear_num_key_heads {num_k_heads}"
            )
        first_k, self.num_k_heads = tp.split(num_k_heads, "gated DeltaNet key heads")
        first_v, self.num_v_heads = tp.split(num_v_heads, "DeltaNet value heads")
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.d_conv = config.linear_conv_kernel_dim
        self.fused_projections = fused_projections
        hidden = config.hidden_size
        keys = Rows.units(first_k, self.num_k_heads, self.head_k_dim, num_k_heads)
        values = Rows.units(first_v, self.num_v_heads, self.head_v_dim, num_v_heads)
        v_heads = Rows.units(first_v, self.num_v_heads, 1, num_v_heads)
        self.conv1d = depthwise_conv(Rows.sections([keys, keys, values]), self.d_conv, False, tp)
        if fused_projections:
            qkvz, ba = self._fused_rows(config, first_k, first_v)
            self.in_proj_qkvz = column_linear(hidden, qkvz, False, tp)
            self.in_proj_ba = column_linear(hidden, ba, False, tp)
        else:
            self.in_proj_qkv = column_linear(hidden, Rows.sections([keys, keys, values]), False, tp)
            self.in_proj_z = column_linear(hidden, values, False, tp)
            self.in_proj_b = column_linear(hidden, v_heads, False, tp)
            self.in_proj_a = column_linear(hidden, v_heads, False, tp)
        self.dt_bias = shard_param(nn.Parameter(torch.ones(self.num_v_heads)), v_heads, tp)
        self.A_log = shard_param(nn.Parameter(torch.zeros(self.num_v_heads)), v_heads, tp)
        self.norm = GatedHeadNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = row_linear(values, hidden, False, tp)

    def _fused_rows(self, config: Any, first_k: int, first_v: int) -> tuple[Rows, Rows]:
        """This rank's rows of Qwen3-Next's fused projections, which interleave per key
        head ``[q, k, v (Hv/Hk heads), z (Hv/Hk heads)]`` and ``[b, a]`` (Hv/Hk each):
        per local key head, its q and k and the local value heads' v, z, b and a, so
        the local tensors interleave the same way at local sizes."""
        dk, dv = self.head_k_dim, self.head_v_dim
        group = config.linear_num_value_heads // config.linear_num_key_heads
        block = 2 * dk + 2 * group * dv
        qkvz: list[tuple[int, int]] = []
        ba: list[tuple[int, int]] = []
        local_group = self.num_v_heads // self.num_k_heads
        for key_head in range(first_k, first_k + self.num_k_heads):
            # the local value heads this key head serves, as offsets inside its group
            first = max(first_v, key_head * group) - key_head * group
            v_start = key_head * block + 2 * dk
            qkvz.append((key_head * block, v_start))  # q and k
            qkvz.append((v_start + first * dv, v_start + (first + local_group) * dv))  # v
            z_start = v_start + group * dv
            qkvz.append((z_start + first * dv, z_start + (first + local_group) * dv))  # z
            b_start = key_head * 2 * group
            ba.append((b_start + first, b_start + first + local_group))
            ba.append((b_start + group + first, b_start + group + first + local_group))
        num_k = config.linear_num_key_heads
        return (
            Rows(tuple(qkvz), num_k * block, self.num_k_heads * (2 * dk + 2 * local_group * dv)),
            Rows(tuple(ba), num_k * 2 * group, 2 * self.num_v_heads),
        )

    @property
    def ssm_shape(self) -> tuple[int, int, int]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv [T, conv_dim]`` (q, k, v of every head, in that order), the gate
        ``z [T, Hv, dv]`` and ``ba [T, 2 Hv]`` (b then a)."""
        n = x.shape[0]
        if not self.fused_projections:
            ba = torch.cat([self.in_proj_b(x), self.in_proj_a(x)], dim=-1)
            z = self.in_proj_z(x).view(n, self.num_v_heads, self.head_v_dim)
            return self.in_proj_qkv(x), z, ba
        # Qwen3-Next interleaves per key head: [q, k, v (Hv/Hk heads), z (Hv/Hk heads)]
        group = self.num_v_heads // self.num_k_heads
        per_head = self.in_proj_qkvz(x).view(n, self.num_k_heads, -1)
        sizes = [self.head_k_dim, self.head_k_dim, group * self.head_v_dim, group * self.head_v_dim]
        q, k, v, z = per_head.split(sizes, dim=-1)
        b, a = self.in_proj_ba(x).view(n, self.num_k_heads, 2 * group).split(group, dim=-1)
        qkv = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=-1)
        ba = torch.cat([b.reshape(n, -1), a.reshape(n, -1)], dim=-1)
        return qkv, z.reshape(n, self.num_v_heads, self.head_v_dim), ba

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches) -> torch.Tensor:
        qkv, z, ba = self.project(x)
        conv_states, ssm_states = cache.state(self.layer_index)
        y = self.ops.gated_delta_mix(self, qkv, ba, conv_states, ssm_states, batch)
        y = self.norm(y.view(z.shape), z)  # [T, Hv, dv]
        return self.out_proj(y.reshape(x.shape[0], self.value_dim))

    def rule_inputs(self, qkv: torch.Tensor, ba: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The conv output split into q, k ``[T, Hk, dk]`` and v ``[T, Hv, dv]``, and the
        log decay ``g = -exp(A_log) softplus(a + dt_bias)`` and ``beta = sigmoid(b)``."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        b, a = ba.split(self.num_v_heads, dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return (
            q.reshape(n, self.num_k_heads, self.head_k_dim),
            k.reshape(n, self.num_k_heads, self.head_k_dim),
            v.reshape(n, self.num_v_heads, self.head_v_dim),
            g,
            b.sigmoid(),
        )

    def prefill(
        self, qkv: torch.Tensor, ba: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's chunk, continuing from (and updating) its conv and state."""
        weight = self.conv1d.weight.squeeze(1)
        qkv = ref.causal_conv1d(qkv, conv, weight, self.conv1d.bias, "silu")
        y = deltanet.gated_delta_chunked(*self.rule_inputs(qkv, ba), ssm, CHUNK_SIZE)
        return y.reshape(qkv.shape[0], self.value_dim).to(qkv.dtype)

    def decode(
        self,
        qkv: torch.Tensor,
        ba: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of N sequences: gather their states, step, scatter back."""
        weight = self.conv1d.weight.squeeze(1)
        qkv = ref.causal_conv1d_step(qkv, conv_states, slots, weight, self.conv1d.bias, "silu")
        state = ssm_states[slots]  # [N, Hv, dk, dv], a copy
        y = deltanet.gated_delta_step(state, *self.rule_inputs(qkv, ba))
        ssm_states[slots] = state
        return y.reshape(qkv.shape[0], self.value_dim).to(qkv.dtype)


class GatedAttention(PagedAttention):
    """Attention whose query projection also yields a per-channel output gate
    (``o_proj(attn * sigmoid(gate))``), with per-head q/k norms before the rotary."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        head_dim = int(config.head_dim)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        super().__init__(layer_index, config.hidden_size, heads, kv_heads, head_dim,
                         scale=head_dim**-0.5, bias=config.attention_bias, tp=tp)  # fmt: skip
        bias = config.attention_bias
        # each head's query and gate side by side
        q_rows = Rows.units(self.first_head, self.num_heads, 2 * head_dim, heads)
        self.q_proj = column_linear(config.hidden_size, q_rows, bias, tp)
        self.q_norm = OffsetRMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: LayerCaches, rope: Rope
    ) -> torch.Tensor:
        n = x.shape[0]
        q, gate = self.q_proj(x).view(n, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)  # [T, H, D]
        k = self.k_norm(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.attend(q, k, v, batch, cache).reshape(n, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(n, -1)))


class TopKRouter(nn.Module):
    """Softmax over the experts in float32, top-k, renormalised when the config says so."""

    def __init__(self, config: Any, normalise: bool) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalise = normalise
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), index


class SparseMoe(nn.Module):
    """Routed experts (per-expert checkpoint layout) plus a shared expert scaled by
    ``sigmoid(shared_expert_gate(x))``; under tensor parallelism each rank runs its
    share of the experts and its columns of the shared one, and one all-reduce adds
    both."""

    def __init__(self, config: Any, normalise: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, act = config.hidden_size, config.hidden_act
        self.gate = TopKRouter(config, normalise)
        self.experts = local_experts(
            lambda: GatedMLP(h, config.moe_intermediate_size, act), config.num_experts, tp
        )
        self.shared_expert = GatedMLP(h, config.shared_expert_intermediate_size, act, tp=tp,
                                      reduce=False)  # fmt: skip
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x)
        routed = self.experts(x, index, weights)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(routed.to(x.dtype) + shared)


def is_sparse_layer(config: Any, layer_index: int) -> bool:
    """Whether a layer's MLP is the mixture of experts (Qwen3-Next's rule; Qwen3.5-MoE
    has no ``decoder_sparse_step`` and every layer sparse)."""
    if int(getattr(config, "num_experts", 0) or 0) == 0:
        return False
    if layer_index in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (layer_index + 1) % int(getattr(config, "decoder_sparse_step", 1) or 1) == 0


class QwenHybridBlock(nn.Module):
    """Pre-norm block: DeltaNet or gated attention, then the MLP or the experts."""

    def __init__(
        self,
        config: Any,
        layer_index: int,
        *,
        fused: bool,
        normalise: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = OffsetRMSNorm(config.hidden_size, eps)
        self.linear_attn: GatedDeltaNet | None = None
        self.self_attn: GatedAttention | None = None
        kind = config.layer_types[layer_index]
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, layer_index, fused, tp)
        elif kind == "full_attention":
            self.self_attn = GatedAttention(config, layer_index, tp)
        else:
            raise ValueError(f"unknown layer type {kind!r} at layer {layer_index}")
        self.mlp: nn.Module
        if is_sparse_layer(config, layer_index):
            self.mlp = SparseMoe(config, normalise, tp)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                tp=tp)  # fmt: skip

    def forward(self, x: Residual, batch: StepBatch, cache: LayerCaches, rope: Rope) -> None:
        h = x.norm(self.input_layernorm)
        if self.linear_attn is not None:
            x.add(self.linear_attn(h, batch, cache))
        else:
            assert self.self_attn is not None
            x.add(self.self_attn(h, batch, cache, rope))
        x.add(self.mlp(x.norm(self.post_attention_layernorm)))


class Qwen3NextModel(HybridModel):
    """Qwen3-Next: fused DeltaNet projections; experts renormalised per ``norm_topk_prob``."""

    family = "qwen3_next"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
    fused_projections = True
    always_normalise = False  # Qwen3.5-MoE renormalises whatever the config says

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        text = text_config(config)
        super().__init__(text, tp)
        normalise = self.always_normalise or bool(getattr(text, "norm_topk_prob", True))

        def block(cfg: Any, i: int, tp: TensorParallel) -> QwenHybridBlock:
            return QwenHybridBlock(cfg, i, fused=self.fused_projections, normalise=normalise,
                                   tp=tp)  # fmt: skip

        self.model = HybridBody(text, block, text.rms_norm_eps, norm_name="norm", tp=tp)
        self.model.norm = OffsetRMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = lm_head(text.hidden_size, text.vocab_size, tp)
        params = getattr(text, "rope_parameters", None) or {}
        partial = float(params.get("partial_rotary_factor", 0.25))
        self.rotary = Rotary(int(text.head_dim), rope_theta(text), partial)

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        x = self.model.embed(input_ids)
        return self.model.run(x, batch, cache, self.rotary.cos_sin(batch.positions, x.dtype))

    def can_capture_decode(self) -> bool:
        """With experts only where they take the grouped path on its fast kernel (bf16
        on an H100/H200-class GPU): every shape then follows from the batch size, where
        the loop's routing has data-dependent shapes (`avmp.engine.experts`)."""
        moe = [m for m in self.modules() if isinstance(m, SparseMoe)]
        return all(m.experts.is_capturable() for m in moe)

    def can_capture_mixed(self) -> bool:
        """As decode: the gated delta rule's prefill path (chunked and one-token kernels
        split on the device) and gated attention read device arrays alone; experts only
        on the grouped path."""
        return self.can_capture_decode()

    def geometry(
        self,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype | None = None,
        conv_columns: ConvColumns = ConvColumns.VLLM,
    ) -> ModelGeometry:
        """Attention KV and, per DeltaNet layer, its conv and recurrent state (the
        base class knows only Mamba mixers)."""
        kv_name = TORCH_DTYPE_NAMES[dtype]
        ssm_name = TORCH_DTYPE_NAMES[ssm_dtype or dtype]
        attention, recurrent = [], []
        for m in self.modules():
            if isinstance(m, GatedAttention):
                attention.append(AttentionLayer(m.layer_index, m.num_kv_heads, m.head_dim, kv_name))
            elif isinstance(m, GatedDeltaNet):
                columns = conv_columns.columns(m.d_conv)
                conv = CacheTensor("conv", (m.conv_dim, columns), kv_name)
                ssm = CacheTensor("ssm", m.ssm_shape, ssm_name)
                recurrent.append(RecurrentLayer(m.layer_index, LayerKind.GATED_DELTANET, ssm, conv))
        num_params = sum(p.numel() for p in self.parameters())
        return ModelGeometry(
            name=getattr(self.config, "name_or_path", "") or self.family,
            family=self.family,
            num_layers=int(self.config.num_hidden_layers),
            attention_layers=tuple(attention),
            recurrent_layers=tuple(recurrent),
            hidden_size=int(self.config.hidden_size),
            vocab_size=int(self.config.vocab_size),
            num_params=num_params,
            num_active_params=num_params,
            weight_dtype=kv_name,
            ssm_dtype=ssm_name,
            conv_columns=conv_columns,
            num_ranks=self.tp.size,
        )


class Qwen35Model(Qwen3NextModel):
    """Qwen3.5 / Qwen3.6 dense text model: four plain DeltaNet projections."""

    family = "qwen3_5"
    fused_projections = False


class Qwen35MoeModel(Qwen3NextModel):
    """Qwen3.5 / Qwen3.6 MoE text model: plain projections, experts always renormalised."""

    family = "qwen3_5_moe"
    fused_projections = False
    always_normalise = True
