"""Reference kernels in plain torch (CPU and GPU) for the engine's hybrid layers.

Every kernel reads and writes the caches only through the tensors it is handed: per-layer
views over the pools (K/V ``[num_pages, block_size, kv_heads, head_dim]``, conv state
``[num_slots, channels, columns]``, SSM state ``[num_slots, ...]``). Compaction and
migration move the pools' bytes, so a kernel that kept its own copy would go stale.

The numerics follow Hugging Face transformers' PyTorch paths (the ones it runs when
mamba_ssm and causal_conv1d are absent), so greedy decoding in float32 is token-identical.
These kernels are correct first and fast second; Triton versions replace them on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_ids: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Store new keys and values in their pages.

    Args:
        k_cache, v_cache: ``[num_pages, block_size, kv_heads, head_dim]`` views.
        key, value: ``[T, kv_heads, head_dim]``.
        page_ids, offsets: ``[T]`` page and in-page position of each token.
    """
    k_cache[page_ids, offsets] = key.to(k_cache.dtype)
    v_cache[page_ids, offsets] = value.to(v_cache.dtype)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first ``num_tokens`` keys and values, ``[num_tokens, kv_heads, head_dim]``."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache[block_table].reshape(-1, kv_heads, head_dim)[:num_tokens]
    values = v_cache[block_table].reshape(-1, kv_heads, head_dim)[:num_tokens]
    return keys, values


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    num_context_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its paged KV.

    The new tokens' K/V must already be written (``write_kv``). Query token ``i`` sits
    at position ``num_context_tokens + i`` and sees every position up to its own. Decode
    is the case of one query token.

    Args:
        query: ``[Tq, heads, head_dim]``.
        block_table: the sequence's page ids in token order.
    Returns:
        ``[Tq, heads, head_dim]``.
    """
    num_query = query.shape[0]
    total = num_context_tokens + num_query
    keys, values = gather_kv(k_cache, v_cache, block_table, total)  # [Tk, Hkv, D]
    groups = query.shape[1] // keys.shape[1]
    keys = keys.to(query.dtype).repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, Tk, D]
    values = values.to(query.dtype).repeat_interleave(groups, dim=1).transpose(0, 1)
    q = query.transpose(0, 1)  # [H, Tq, D]
    query_pos = torch.arange(num_context_tokens, total, device=query.device)
    key_pos = torch.arange(total, device=query.device)
    mask = key_pos[None, :] <= query_pos[:, None]  # [Tq, Tk]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=scale
    )
    return out[0].transpose(0, 1)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_tokens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its pages, for a batch of sequences.

    Args:
        query: ``[N, heads, head_dim]``, the token at position ``num_tokens - 1``.
        block_tables: ``[N, max_pages]`` page ids, padded with any valid page.
        num_tokens: ``[N]`` tokens each sequence holds, the new one included.
    Returns:
        ``[N, heads, head_dim]``.
    """
    n, max_pages = block_tables.shape
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    keys = k_cache[block_tables].reshape(n, max_pages * block_size, kv_heads, head_dim)
    values = v_cache[block_tables].reshape(n, max_pages * block_size, kv_heads, head_dim)
    positions = torch.arange(max_pages * block_size, device=query.device)
    valid = positions[None, :] < num_tokens[:, None]  # [N, Tk]
    # Positions past a sequence's end hold whatever the pool held (after a migration,
    # bytes of the other pool, possibly NaN patterns): zero them, since a masked-out
    # value still meets its zero weight in probs @ V and 0 * NaN is NaN.
    keep = valid[:, :, None, None]
    keys = torch.where(keep, keys, torch.zeros((), dtype=keys.dtype, device=keys.device))
    values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    groups = query.shape[1] // kv_heads
    keys = keys.to(query.dtype).repeat_interleave(groups, dim=2).transpose(1, 2)  # [N, H, Tk, D]
    values = values.to(query.dtype).repeat_interleave(groups, dim=2).transpose(1, 2)
    mask = valid[:, None, None, :]  # [N, 1, 1, Tk]
    out = F.scaled_dot_product_attention(
        query[:, :, None], keys, values, attn_mask=mask, scale=scale
    )
    return out[:, :, 0]


def causal_conv1d(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal conv over new tokens, continuing from (and updating) a conv state.

    The state keeps the last ``columns >= d_conv - 1`` inputs of the sequence, zeros
    before the first token; with ``d_conv`` columns (transformers' layout) the oldest
    column is kept but never read.

    Args:
        x: ``[T, channels]``.
        conv_state: ``[channels, columns]`` view into the request's slot (updated in place).
        weight: ``[channels, d_conv]``.
    Returns:
        ``[T, channels]``.
    """
    num_tokens, channels = x.shape
    d_conv = weight.shape[1]
    columns = conv_state.shape[1]
    full = torch.cat([conv_state.to(weight.dtype), x.t().to(weight.dtype)], dim=1)  # [C, W + T]
    window = full[:, columns - (d_conv - 1) :]  # [C, d_conv - 1 + T]
    out = F.conv1d(window.unsqueeze(0), weight.unsqueeze(1), bias, groups=channels)[0]  # [C, T]
    conv_state.copy_(full[:, -columns:].to(conv_state.dtype))
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}")
    return out.t().to(x.dtype)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_states: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decode token per sequence through the causal conv, updating each slot's state.

    Args:
        x: ``[N, channels]``.
        conv_states: ``[num_slots, channels, columns]`` view of the layer's states.
        slots: ``[N]`` rows of ``conv_states``.
    Returns:
        ``[N, channels]``.
    """
    channels, d_conv = weight.shape
    columns = conv_states.shape[2]
    full = torch.cat([conv_states[slots].to(weight.dtype), x[:, :, None].to(weight.dtype)], dim=2)
    window = full[:, :, columns + 1 - d_conv :]  # [N, C, d_conv]
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=channels)[:, :, 0]  # [N, C]
    conv_states[slots] = full[:, :, 1:].to(conv_states.dtype)
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}")
    return out.to(x.dtype)


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums ``[..., L, L]`` of ``x [..., L]``, -inf above the diagonal."""
    length = x.size(-1)
    x = x[..., None].expand(*x.size(), length)
    strict = torch.tril(torch.ones(length, length, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    sums = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(length, length, device=x.device, dtype=torch.bool), diagonal=0)
    return sums.masked_fill(~lower, -torch.inf)


def _chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """``[T, ...]`` -> ``[num_chunks, chunk, ...]`` with zero padding at the end."""
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    return x.reshape(-1, chunk, *x.shape[1:])


def mamba2_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD scan of one sequence (the chunked form transformers runs for prefill).

    Args:
        x: ``[T, heads, head_dim]``; dt: ``[T, heads]`` already discretised (softplus, clamp);
        A, D: ``[heads]``; B, C: ``[T, groups, d_state]``;
        initial_state: ``[heads, head_dim, d_state]``.
    Returns:
        y ``[T, heads, head_dim]`` (float32) and the final state (float32).
    """
    length, heads, _ = x.shape
    reps = heads // B.shape[1]
    x = x.float()
    B = B.float().repeat_interleave(reps, dim=1)  # [T, H, N]
    C = C.float().repeat_interleave(reps, dim=1)
    pad = (chunk_size - length % chunk_size) % chunk_size
    d_residual = D[:, None].float() * x
    x = x * dt[..., None].float()
    a = A.float() * dt.float()  # [T, H]
    x, a, B, C = (_chunks(t, pad, chunk_size) for t in (x, a, B, C))
    a = a.permute(2, 0, 1)  # [H, c, l]
    a_cumsum = torch.cumsum(a, dim=-1)
    decay = torch.exp(_segment_sum(a))  # [H, c, l, s]
    scores = torch.einsum("clhn,cshn->clsh", C, B)
    y_diag = torch.einsum("clsh,cshp->clhp", scores * decay.permute(1, 2, 3, 0), x)
    decay_states = torch.exp(a_cumsum[:, :, -1:] - a_cumsum)  # [H, c, l]
    states = torch.einsum("clhn,clhp->chpn", B * decay_states.permute(1, 2, 0)[..., None], x)
    states = torch.cat([initial_state.float()[None], states], dim=0)  # [c + 1, H, P, N]
    # [H, c + 1 (target), z (source)] -> [z, c + 1, H]
    decay_chunk = torch.exp(_segment_sum(F.pad(a_cumsum[:, :, -1], (1, 0)))).permute(2, 1, 0)
    new_states = torch.einsum("zch,zhpn->chpn", decay_chunk, states)
    states, final_state = new_states[:-1], new_states[-1]
    y_off = (
        torch.einsum("clhn,chpn->clhp", C, states) * torch.exp(a_cumsum).permute(1, 2, 0)[..., None]
    )
    y = (y_diag + y_off).reshape(-1, heads, x.shape[-1])[:length]
    return y + d_residual, final_state


def mamba2_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One Mamba2 decode step for a batch of sequences, updating their states in place.

    Args:
        state: ``[N, heads, head_dim, d_state]`` (gathered slot states, written back by the caller).
        x: ``[N, heads, head_dim]``; dt: ``[N, heads]`` discretised; B, C: ``[N, groups, d_state]``.
    Returns:
        y ``[N, heads, head_dim]``.
    """
    heads = x.shape[1]
    reps = heads // B.shape[1]
    B = B.repeat_interleave(reps, dim=1)  # [N, H, S]
    C = C.repeat_interleave(reps, dim=1)
    dt4 = dt[:, :, None, None]  # [N, H, 1, 1]
    dA = torch.exp(dt4.float() * A.float()[None, :, None, None])
    dBx = dt4 * B[:, :, None, :] * x[..., None]
    new_state = state.float() * dA + dBx.float()
    state.copy_(new_state.to(state.dtype))
    y = torch.einsum("nhps,nhs->nhp", new_state.to(C.dtype), C)
    return y + x * D[None, :, None]


def mamba1_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """Mamba1 selective scan of one sequence, sequential and exact, updating ``state``.

    Args:
        x, dt: ``[T, d_inner]`` (dt after softplus); A: ``[d_inner, d_state]``;
        B, C: ``[T, d_state]``; D: ``[d_inner]``; state: ``[d_inner, d_state]`` (in place).
    Returns:
        y ``[T, d_inner]`` (float32).
    """
    dA = torch.exp(A[None].float() * dt.float()[:, :, None])  # [T, I, S]
    dBx = dt.float()[:, :, None] * B.float()[:, None, :] * x.float()[:, :, None]
    h = state.float()
    outputs = []
    for t in range(x.shape[0]):
        h = dA[t] * h + dBx[t]
        outputs.append(h @ C[t].float())  # [I]
    state.copy_(h.to(state.dtype))
    y = torch.stack(outputs, dim=0)
    return y + x.float() * D.float()[None, :]


def mamba1_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One Mamba1 decode step for a batch, updating ``state [N, d_inner, d_state]`` in place.

    Args:
        x, dt: ``[N, d_inner]`` (dt after softplus); B, C: ``[N, d_state]``.
    Returns:
        y ``[N, d_inner]`` (float32).
    """
    dA = torch.exp(A[None].float() * dt.float()[:, :, None])
    dBx = dt.float()[:, :, None] * B.float()[:, None, :] * x.float()[:, :, None]
    h = dA * state.float() + dBx
    state.copy_(h.to(state.dtype))
    y = (h @ C.float()[:, :, None])[:, :, 0]
    return y + x.float() * D.float()[None, :]
