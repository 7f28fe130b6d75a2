"""Store a step's new keys and values in their pages, one program per token.

The engine hands every token a flat cache position ``page_row * block_size + offset``
(its slot mapping). Padding rows of a CUDA-graph batch carry -1 and are skipped, so a
padded batch never writes into a page some request owns, and on the CUDA VMM backing
never touches an unmapped address. The pool views are strided (a page holds every
attention layer's K and V), so the kernel takes every stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avmp.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_same_device,
    check_shape,
    next_power_of_2,
)


@triton.jit
def _kv_write_kernel(
    k_cache_ptr,
    v_cache_ptr,
    key_ptr,
    value_ptr,
    slot_ptr,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_keyt,
    stride_keyh,
    stride_keyd,
    stride_valt,
    stride_valh,
    stride_vald,
    block_size,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row: nothing to write (a return, not a mask mixing the scalar in)
        return
    page = slot // block_size
    in_page = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = t.to(tl.int64)
    key = tl.load(
        key_ptr + row * stride_keyt + offs_h[:, None] * stride_keyh + offs_d[None, :] * stride_keyd,
        mask=mask,
        other=0.0,
    )
    value = tl.load(
        value_ptr
        + row * stride_valt
        + offs_h[:, None] * stride_valh
        + offs_d[None, :] * stride_vald,
        mask=mask,
        other=0.0,
    )
    tl.store(
        k_cache_ptr
        + page * stride_kp
        + in_page * stride_kt
        + offs_h[:, None] * stride_kh
        + offs_d[None, :] * stride_kd,
        key.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr
        + page * stride_vp
        + in_page * stride_vt
        + offs_h[:, None] * stride_vh
        + offs_d[None, :] * stride_vd,
        value.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def kv_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` into the pages of
    ``k_cache``/``v_cache`` ``[num_pages, block_size, kv_heads, head_dim]`` (any strides).

    Args:
        slot_mapping: ``[T]`` int32/int64 flat position ``page * block_size + offset``
            of each token; a negative entry marks a padding row, which writes nothing.
    """
    tokens, heads, head_dim = key.shape
    check_shape("value", value, tuple(key.shape))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("slot_mapping", slot_mapping, (tokens,))
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (heads, head_dim):
        raise ValueError(f"k_cache must be [pages, block_size, {heads}, {head_dim}]")
    check_dtype("key", key, FLOAT_DTYPES)
    check_dtype("k_cache", k_cache, FLOAT_DTYPES)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    check_same_device(k=k_cache, v=v_cache, key=key, value=value, slots=slot_mapping)
    if tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()  # one index per program, read at +t
    _kv_write_kernel[(tokens,)](
        k_cache,
        v_cache,
        key,
        value,
        slot_mapping,
        *k_cache.stride(),
        *v_cache.stride(),
        *key.stride(),
        *value.stride(),
        k_cache.shape[1],
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(heads),
        BLOCK_D=next_power_of_2(head_dim),
    )
