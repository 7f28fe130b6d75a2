"""Hand-built geometries for the layout and planner tests (no zoo needed), and `fill`."""

from __future__ import annotations

from avmp.memory.spec import CacheAllocator
from avmp.models.geometry import (
    AttentionLayer,
    CacheTensor,
    LayerKind,
    ModelGeometry,
    RecurrentLayer,
)


def mamba1_layer(index: int, d_inner: int = 8192, d_state: int = 16, d_conv: int = 4,
                 ssm_dtype: str = "bfloat16") -> RecurrentLayer:
    return RecurrentLayer(
        layer_index=index,
        kind=LayerKind.MAMBA1,
        ssm=CacheTensor("ssm", (d_inner, d_state), ssm_dtype),
        conv=CacheTensor("conv", (d_inner, d_conv - 1), "bfloat16"),
    )


def hybrid(name: str, attention: list[AttentionLayer], recurrent: list[RecurrentLayer],
           ssm_dtype: str = "bfloat16") -> ModelGeometry:
    return ModelGeometry(
        name=name,
        family="test",
        num_layers=max(len(attention), len(recurrent)) or 1,
        attention_layers=tuple(attention),
        recurrent_layers=tuple(recurrent),
        hidden_size=4096,
        vocab_size=65536,
        num_params=1,
        num_active_params=1,
        ssm_dtype=ssm_dtype,
    )


def jamba_mini(ssm_dtype: str = "bfloat16") -> ModelGeometry:
    """Jamba-1.5-Mini: attention every 8th layer from 4 (8 KV heads x 128), 28 Mamba1."""
    attention = [AttentionLayer(i, 8, 128) for i in range(4, 32, 8)]
    recurrent = [mamba1_layer(i, ssm_dtype=ssm_dtype) for i in range(32) if i % 8 != 4]
    return hybrid("jamba-1.5-mini", attention, recurrent, ssm_dtype)


def small_hybrid(num_attention: int = 2, num_recurrent: int = 6, d_inner: int = 256,
                 kv_heads: int = 2, head_dim: int = 32) -> ModelGeometry:
    """A small hybrid whose units are tens of KiB, so tests run with small budgets."""
    attention = [AttentionLayer(i, kv_heads, head_dim) for i in range(num_attention)]
    recurrent = [mamba1_layer(100 + i, d_inner=d_inner) for i in range(num_recurrent)]
    return hybrid("small-hybrid", attention, recurrent)


def pure_recurrent(num_layers: int = 4, d_inner: int = 1024) -> ModelGeometry:
    return hybrid("pure-mamba", [], [mamba1_layer(i, d_inner=d_inner) for i in range(num_layers)])


def pure_attention(num_layers: int = 4) -> ModelGeometry:
    return hybrid("pure-attention", [AttentionLayer(i, 8, 128) for i in range(num_layers)], [])


def fill(allocator: CacheAllocator, num_tokens: int) -> int:
    """Admit requests of ``num_tokens`` until memory is short; return how many fit."""
    count = 0
    while allocator.admit(count, num_tokens) is not None:
        count += 1
    allocator.check_integrity()
    return count
