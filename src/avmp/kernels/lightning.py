"""Lightning attention (MiniMax-Text-01's linear attention), torch reference.

Per head ``h`` with decay rate ``s_h``, the state is a ``[head_dim, head_dim]`` matrix:

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t        o_t = q_t S_t

so a token sees itself with weight 1 and a token ``d`` positions back with
``exp(-s_h * d)``. There is no conv and no other state. Prefill computes the same thing
block by block (the lightning-attention algorithm: a decayed causal product inside a
block, the carried state for everything before it), starting from and ending in the
request's state; decode takes one recurrent step per sequence.

A slot stores each head's ``S`` transposed, ``S^T [v dim, k dim]``: that is the Mamba2
recurrence with ``dt = 1``, ``A = -s_h``, ``B = k``, ``C = q``, ``x = v`` (one group per
head), whose state Mamba2 keeps as ``[heads, head_dim (x), d_state (B)]``, so the
Mamba2 Triton kernels run lightning layers on the slot as it lies
(`avmp.engine.triton_lightning`). transformers keeps ``S`` itself; only the engine's
slots hold the transpose, and both dimensions are ``head_dim``, so the geometry is the
same.
"""

from __future__ import annotations

import torch


def slope_rates(num_heads: int, layer_index: int, num_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay rates ``[H]``: ALiBi-like slopes ``2^(-8 (h+1) / H)``,
    scaled down with depth (``1 - l / (L - 1)``, plus a small floor)."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads, dtype=torch.float32) + 1
    factor = 1 - layer_index / (num_layers - 1 + 1e-5) + 1e-5
    return base**exponent * factor


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """One sequence's new tokens, continuing from (and updating) its state.

    Args:
        q, k, v: ``[T, H, D]``.
        slope: ``[H]`` decay rates.
        state: ``[H, D, D]`` view into the request's slot, ``S^T`` (updated in place).
        block_size: tokens per block of the blockwise algorithm.
    Returns:
        ``[T, H, D]``.
    """
    dtype = v.dtype
    q, k, v = (t.transpose(0, 1).to(dtype) for t in (q, k, v))  # [H, T, D]
    s = slope.to(dtype)[:, None, None]  # [H, 1, 1]
    carried = state.transpose(-1, -2).to(dtype)  # [H, D (k), D (v)]
    out = []
    for start in range(0, q.shape[1], block_size):
        qb, kb, vb = (t[:, start : start + block_size] for t in (q, k, v))
        n = qb.shape[1]
        steps = torch.arange(1, n + 1, device=q.device, dtype=dtype)[:, None]  # [n, 1]
        gaps = steps - steps.t()  # [n, n]: i - j
        within = torch.exp(torch.where(gaps >= 0, -s * gaps, float("-inf")))  # [H, n, n]
        intra = (qb @ kb.transpose(-1, -2) * within) @ vb
        inter = (qb * torch.exp(-s * steps)) @ carried
        out.append(intra + inter)
        key_decay = torch.exp(-s * (n - steps))  # [H, n, 1]
        carried = carried * torch.exp(-s * n) + (kb * key_decay).transpose(-1, -2) @ vb
    state.copy_(carried.transpose(-1, -2).to(state.dtype))
    return torch.cat(out, dim=1).transpose(0, 1)  # [T, H, D]


def lightning_step(
    states: torch.Tensor,
    slots: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
) -> torch.Tensor:
    """One token for each of N sequences: gather their states, step, scatter back.

    Args:
        states: ``[num_slots, H, D, D]`` view of the layer's states (``S^T`` each).
        slots: ``[N]`` rows of ``states``.
        q, k, v: ``[N, H, D]``.
        slope: ``[H]``.
    Returns:
        ``[N, H, D]``.
    """
    dtype = v.dtype
    state = states[slots].transpose(-1, -2).to(dtype)  # [N, H, D (k), D (v)], a copy
    ratio = torch.exp(-slope.to(dtype))[None, :, None, None]
    state = ratio * state + k.to(dtype)[..., :, None] @ v.to(dtype)[..., None, :]
    states[slots] = state.transpose(-1, -2).to(states.dtype)
    return (q.to(dtype)[..., None, :] @ state)[..., 0, :]


def lightning_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
    query_start_loc: torch.Tensor,
    has_initial_state: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Every sequence of a step, each from and into its slot: the reference for a
    ragged prefill or mixed step. A sequence without initial state (a new or recomputed
    request) starts from zeros whatever its slot holds.

    Args:
        q, k, v: ``[T, H, D]``, the sequences' tokens back to back.
        states: ``[num_slots, H, D, D]`` (``S^T`` each).
        slots: ``[B]`` each sequence's row of ``states``.
        query_start_loc: ``[B + 1]`` token offsets of the sequences.
        has_initial_state: ``[B]`` bool.
    Returns:
        ``[T, H, D]``.
    """
    out = torch.empty_like(v)
    bounds = query_start_loc.tolist()
    for i, slot in enumerate(slots.tolist()):
        rows = slice(bounds[i], bounds[i + 1])
        state = states[slot]
        if not bool(has_initial_state[i]):
            state.zero_()
        out[rows] = lightning_prefill(q[rows], k[rows], v[rows], slope, state, block_size)
    return out
