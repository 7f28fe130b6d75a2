"""Zamba2: a Mamba2 mixer in every layer; at the ``hybrid`` layers a shared transformer
block runs first and its output, through a per-layer linear, joins the Mamba2 input.

``num_mem_blocks`` blocks are shared round-robin over the hybrid layers: the j-th hybrid
layer uses block ``j % num_mem_blocks``. A block's weights are one set, but each use is
its own attention layer of the cache (its own KV pages, keyed by the hybrid layer's
index) and may add its own low-rank adapters to q, k, v and to the MLP's gate/up. The
block reads ``concat(hidden, embeddings)``, twice the model width.

Checkpoints (``save_pretrained``) hold a shared block once, under the first hybrid layer
that uses it (``model.layers.{i}.shared_transformer``); later uses borrow it without
registering it, so the module tree has the checkpoint's names and no more.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from avmp.engine.batch import LayerCaches, StepBatch
from avmp.engine.models.base import TORCH_DTYPE_NAMES, HybridModel
from avmp.engine.models.layers import (
    Mamba2Mixer,
    OpsLayer,
    RMSNorm,
    Rope,
    Rotary,
    activation,
    apply_rotary,
    glu_linear,
    rope_theta,
)
from avmp.engine.parallel.group import SINGLE, TensorParallel
from avmp.engine.parallel.layers import column_linear, embedding, lm_head, row_linear
from avmp.engine.parallel.shards import Rows
from avmp.models.geometry import AttentionLayer, ConvColumns, ModelGeometry


def _adapters(
    config: Any, block_id: int, width_in: int, rows_out: Rows, tp: TensorParallel
) -> nn.ModuleList:
    """One low-rank adapter per hybrid layer, real only where this block is the one used
    (transformers' layout, so checkpoint indices match); identities elsewhere are never
    called. Under tensor parallelism the down projection is replicated and the up
    projection holds the rows of the output it adds to (``rows_out``)."""
    num_uses = len(config.hybrid_layer_ids)
    rank = config.adapter_rank
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(width_in, rank, bias=False), column_linear(rank, rows_out, False, tp)
        )
        if use % config.num_mem_blocks == block_id
        else nn.Identity()
        for use in range(num_uses)
    )


class Zamba2SharedAttention(OpsLayer):
    """Attention over ``2 * hidden`` inputs, heads of ``2 * hidden / heads`` channels,
    scaled by ``(head_dim / 2) ** -0.5``; optional per-use adapters on q, k and v.
    Sharded by heads as `PagedAttention`."""

    def __init__(self, config: Any, block_id: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        wide = 2 * config.hidden_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = wide // heads
        self.scale = (self.head_dim / 2) ** -0.5
        first, self.num_heads = tp.split(heads, "attention heads")
        first_kv, self.num_kv_heads = tp.split_or_replicate(kv_heads, "KV heads")
        q_rows = Rows.units(first, self.num_heads, self.head_dim, heads)
        kv_rows = Rows.units(first_kv, self.num_kv_heads, self.head_dim, kv_heads)
        self.q_proj = column_linear(wide, q_rows, False, tp)
        self.k_proj = column_linear(wide, kv_rows, False, tp)
        self.v_proj = column_linear(wide, kv_rows, False, tp)
        self.o_proj = row_linear(q_rows, config.hidden_size, False, tp)
        self.has_adapters = bool(config.use_shared_attention_adapter)
        if self.has_adapters and kv_heads != heads:
            # transformers' k and v adapters are 2 * hidden wide, as wide as k and v
            # only without grouped-query attention
            raise ValueError("Zamba2 attention adapters need num_key_value_heads == heads")
        if self.has_adapters:
            self.linear_q_adapter_list = _adapters(config, block_id, wide, q_rows, tp)
            self.linear_k_adapter_list = _adapters(config, block_id, wide, kv_rows, tp)
            self.linear_v_adapter_list = _adapters(config, block_id, wide, kv_rows, tp)

    def forward(
        self,
        x: torch.Tensor,
        use: int,
        layer_index: int,
        batch: StepBatch,
        cache: LayerCaches,
        rope: Rope,
    ) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.has_adapters:
            q = q + self.linear_q_adapter_list[use](x)
            k = k + self.linear_k_adapter_list[use](x)
            v = v + self.linear_v_adapter_list[use](x)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_cache, v_cache = cache.kv(layer_index)
        out = self.ops.attention(q, k, v, k_cache, v_cache, batch, self.scale)
        return self.o_proj(out.reshape(x.shape[0], -1))


class Zamba2SharedMLP(OpsLayer):
    """``down(act(gate) * up)`` with ``gate, up`` from ``gate_up_proj`` plus the use's
    adapter."""

    def __init__(self, config: Any, block_id: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, inner, bias = config.hidden_size, config.intermediate_size, config.add_bias_linear
        rows = Rows.units(*tp.split(inner, "MLP width"), 1, inner)
        gate_up = Rows.sections([rows, rows])
        self.gate_up_proj = column_linear(h, gate_up, bias, tp)
        self.down_proj = row_linear(rows, h, bias, tp)
        self.gate_up_proj_adapter_list = _adapters(config, block_id, h, gate_up, tp)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, use: int) -> torch.Tensor:
        gate_up = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[use](x)
        gate, up = gate_up.chunk(2, dim=-1)
        return glu_linear(self, self.act, gate, up, self.down_proj)


class Zamba2SharedBlock(nn.Module):
    """``mlp(norm(attention(norm(concat(hidden, embeddings)))))``: no residual inside;
    the hybrid layer adds the result to the Mamba2 input."""

    def __init__(self, config: Any, block_id: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Zamba2SharedAttention(config, block_id, tp)
        self.feed_forward = Zamba2SharedMLP(config, block_id, tp)
        self.input_layernorm = RMSNorm(2 * config.hidden_size, eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        embeddings: torch.Tensor,
        use: int,
        layer_index: int,
        batch: StepBatch,
        cache: LayerCaches,
        rope: Rope,
    ) -> torch.Tensor:
        h = self.input_layernorm(torch.cat([x, embeddings], dim=-1))
        h = self.self_attn(h, use, layer_index, batch, cache, rope)
        out: torch.Tensor = self.feed_forward(self.pre_ff_layernorm(h), use)
        return out


def zamba2_mixer(config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> Mamba2Mixer:
    """Zamba2's Mamba2 mixer: conv bias always, gated norm eps 1e-5 over
    ``intermediate / groups`` channels, dt clamped below at ``time_step_min``."""
    d_inner = int(config.mamba_expand * config.hidden_size)
    return Mamba2Mixer(
        layer_index,
        config.hidden_size,
        num_heads=config.n_mamba_heads,
        head_dim=d_inner // config.n_mamba_heads,
        n_groups=config.mamba_ngroups,
        d_state=config.mamba_d_state,
        d_conv=config.mamba_d_conv,
        chunk_size=config.chunk_size,
        eps=1e-5,
        conv_bias=True,
        proj_bias=config.add_bias_linear,
        time_step_limit=(config.time_step_min, float("inf")),
        tp=tp,
    )


class Zamba2MambaLayer(nn.Module):
    """``x + mamba(norm(x + extra))``: the residual skips the shared block's output."""

    def __init__(self, config: Any, layer_index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = zamba2_mixer(config, layer_index, tp)

    def forward(
        self,
        x: torch.Tensor,
        batch: StepBatch,
        cache: LayerCaches,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x if extra is None else x + extra
        out: torch.Tensor = x + self.mamba(self.input_layernorm(h), batch, cache)
        return out


class Zamba2HybridLayer(nn.Module):
    """A shared block's use (``use``-th hybrid layer), its linear, then the Mamba2 layer.
    Under tensor parallelism the linear is replicated (it reads the reduced output of
    the shared block)."""

    def __init__(
        self,
        config: Any,
        layer_index: int,
        use: int,
        block: Zamba2SharedBlock,
        owner: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.layer_index, self.use = layer_index, use
        if owner:
            self.shared_transformer = block
        self._borrowed = (block,)  # a tuple: not registered, so not saved twice
        self.linear = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mamba_decoder = Zamba2MambaLayer(config, layer_index, tp)

    def forward(
        self,
        x: torch.Tensor,
        embeddings: torch.Tensor,
        batch: StepBatch,
        cache: LayerCaches,
        rope: Rope,
    ) -> torch.Tensor:
        block = self._borrowed[0]
        shared = block(x, embeddings, self.use, self.layer_index, batch, cache, rope)
        out: torch.Tensor = self.mamba_decoder(x, batch, cache, self.linear(shared))
        return out


class Zamba2Body(nn.Module):
    """Embeddings, the layers (shared blocks assigned round-robin) and the final norm."""

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, tp)
        blocks = [Zamba2SharedBlock(config, b, tp) for b in range(config.num_mem_blocks)]
        layers: list[nn.Module] = []
        for i, kind in enumerate(config.layers_block_type):
            if kind == "hybrid":
                use = config.hybrid_layer_ids.index(i)
                block_id = use % config.num_mem_blocks
                owner = use < config.num_mem_blocks
                layers.append(Zamba2HybridLayer(config, i, use, blocks[block_id], owner, tp))
            elif kind in ("linear_attention", "mamba"):
                layers.append(Zamba2MambaLayer(config, i, tp))
            else:
                raise ValueError(f"unknown Zamba2 layer type {kind!r} at layer {i}")
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches, rope: Rope
    ) -> torch.Tensor:
        embeddings = self.embed_tokens(input_ids)
        x = embeddings
        for layer in self.layers:
            if isinstance(layer, Zamba2HybridLayer):
                x = layer(x, embeddings, batch, cache, rope)
            else:
                x = layer(x, batch, cache)
        out: torch.Tensor = self.final_layernorm(x)
        return out


class Zamba2Model(HybridModel):
    family = "zamba2"
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.model = Zamba2Body(config, tp)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp)
        self.rotary: Rotary | None = None
        if config.use_mem_rope:
            rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
            if rope_type not in (None, "default"):
                raise ValueError(f"Zamba2 with rope type {rope_type!r} is not supported")
            self.rotary = Rotary(2 * config.hidden_size // config.num_attention_heads,
                                 rope_theta(config))  # fmt: skip

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, cache: LayerCaches
    ) -> torch.Tensor:
        rope = None
        if self.rotary is not None:
            rope = self.rotary.cos_sin(batch.positions, self.lm_head.weight.dtype)
        return self.model.run(input_ids, batch, cache, rope)

    def can_capture_mixed(self) -> bool:
        """Yes: its Mamba2 layers and shared attention blocks' prefill paths read device
        arrays alone."""
        return True

    def geometry(
        self,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype | None = None,
        conv_columns: ConvColumns = ConvColumns.VLLM,
    ) -> ModelGeometry:
        """Mamba2 layers as every family's; one attention layer per shared-block use."""
        geometry = super().geometry(dtype, ssm_dtype, conv_columns)
        kv_name = TORCH_DTYPE_NAMES[dtype]
        attention = tuple(
            AttentionLayer(
                layer.layer_index,
                layer._borrowed[0].self_attn.num_kv_heads,
                layer._borrowed[0].self_attn.head_dim,
                kv_name,
            )
            for layer in self.model.layers
            if isinstance(layer, Zamba2HybridLayer)
        )
        return dataclasses.replace(geometry, attention_layers=attention)
