"""Gated delta rule (Gated DeltaNet, the linear-attention layer of Qwen3-Next and Qwen3.5)
in plain torch: the one-token step for decode and the chunked form for prefill, each
continuing from (and updating) a request's recurrent state in its slot.

Per value head, with the state ``S [dk, dv]``, a token's log decay ``g <= 0`` and write
strength ``beta`` in (0, 1), and L2-normalised ``q``, ``k`` (``q`` also scaled by
``dk ** -0.5``)::

    S <- exp(g) S
    u  = beta * (v - k^T S)          (the part of v the state does not predict yet)
    S <- S + k u^T
    o  = q^T S

Key/query heads may be fewer than value heads: each serves ``Hv / Hk`` consecutive value
heads. Everything runs in float32 whatever the inputs; states are read in their own dtype
and written back in it. The numerics follow transformers' torch fallbacks
(``torch_recurrent_gated_delta_rule``, ``torch_chunk_gated_delta_rule``): the same
function, so greedy decoding in float32 is token-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dimension (the FLA library's form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepared(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """float32 inputs with key heads repeated to the value heads, q and k normalised and
    q scaled. ``q, k [..., Hk, dk]``, ``v [..., Hv, dv]``, ``g, beta [..., Hv]``."""
    reps = v.shape[-2] // k.shape[-2]
    q = l2_normalize(q.float().repeat_interleave(reps, dim=-2))
    k = l2_normalize(k.float().repeat_interleave(reps, dim=-2))
    return q * q.shape[-1] ** -0.5, k, v.float(), g.float(), beta.float()


def gated_delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """One decode token for each of N sequences, updating their states in place.

    Args:
        state: ``[N, Hv, dk, dv]`` (gathered slot states; the caller writes them back).
        q, k: ``[N, Hk, dk]`` before normalisation; v: ``[N, Hv, dv]``;
        g: ``[N, Hv]`` log decay; beta: ``[N, Hv]``.
    Returns:
        ``[N, Hv, dv]`` float32.
    """
    q, k, v, g, beta = _prepared(q, k, v, g, beta)
    s = state.float() * g.exp()[..., None, None]
    predicted = torch.einsum("nhkv,nhk->nhv", s, k)
    update = (v - predicted) * beta[..., None]
    s = s + k[..., :, None] * update[..., None, :]
    state.copy_(s.to(state.dtype))
    return torch.einsum("nhkv,nhk->nhv", s, q)


def gated_delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One sequence token by token (the definition; tests compare the chunked form and
    the Triton kernels with it). Shapes as `gated_delta_chunked`; ``state`` in place."""
    s = state.float()[None].clone()
    outputs = [gated_delta_step(s, q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1],
                                beta[t : t + 1]) for t in range(q.shape[0])]  # fmt: skip
    state.copy_(s[0].to(state.dtype))
    if not outputs:
        return v.new_zeros(v.shape, dtype=torch.float32)
    return torch.cat(outputs, dim=0)


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """One sequence's new tokens through the gated delta rule, in chunks (prefill).

    Within a chunk of L tokens, with ``c`` the cumulative log decay from the chunk's
    start and ``S0`` the state before it, the written values ``U`` solve the unit
    lower-triangular system ``(I + A) U = diag(beta) V - diag(beta e^c) K S0`` with
    ``A[t, s] = beta_t e^(c_t - c_s) k_t . k_s`` (s < t); outputs and the next state
    follow in matrix products. Padding at the end (g = 0, beta = 0) writes nothing.

    Args:
        q, k: ``[T, Hk, dk]`` before normalisation; v: ``[T, Hv, dv]``;
        g: ``[T, Hv]`` log decay (<= 0); beta: ``[T, Hv]``;
        state: ``[Hv, dk, dv]`` view into the request's slot, read, then overwritten
            with the final state (in its own dtype).
    Returns:
        ``[T, Hv, dv]`` float32.
    """
    length = q.shape[0]
    q, k, v, g, beta = _prepared(q, k, v, g, beta)
    pad = (chunk_size - length % chunk_size) % chunk_size
    # [H, C, L, ...]: heads first, then chunks, then positions in a chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).unflatten(1, (-1, chunk_size))
               for x in (q, k, v))  # fmt: skip
    g, beta = (F.pad(x, (0, 0, 0, pad)).t().unflatten(1, (-1, chunk_size)) for x in (g, beta))
    c = g.cumsum(dim=-1)  # [H, C, L]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    gap = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, -torch.inf).exp()  # [H,C,L,L]
    # strictly lower A plus the identity (solve_triangular reads only the lower triangle)
    system = ((k @ k.transpose(-1, -2)) * gap * beta[..., None]).tril(-1)
    system = system + torch.eye(chunk_size, device=q.device)
    written = torch.linalg.solve_triangular(
        system, v * beta[..., None], upper=False, unitriangular=True
    )
    read = torch.linalg.solve_triangular(
        system, k * (beta * c.exp())[..., None], upper=False, unitriangular=True
    )
    attn = (q @ k.transpose(-1, -2)) * gap  # [H, C, L, L], causal incl. the diagonal
    s = state.float()
    out = torch.empty_like(v)
    for i in range(q.shape[1]):
        u = written[:, i] - read[:, i] @ s  # [H, L, dv]
        out[:, i] = (q[:, i] * c[:, i, :, None].exp()) @ s + attn[:, i] @ u
        to_end = (c[:, i, -1:] - c[:, i]).exp()[..., None]  # [H, L, 1]
        s = s * c[:, i, -1].exp()[:, None, None] + (k[:, i] * to_end).transpose(-1, -2) @ u
    state.copy_(s.to(state.dtype))
    return out.flatten(1, 2)[:, :length].transpose(0, 1)


def gated_delta_varlen(
    states: torch.Tensor,
    slot_idx: list[int],
    query_start_loc: list[int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    has_initial_state: list[bool] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Every sequence of a ragged batch through `gated_delta_chunked`, from and into its
    slot: what the Triton prefill kernel computes in one launch.

    Args:
        states: ``[num_slots, Hv, dk, dv]`` pool view.
        slot_idx: each sequence's slot (negative: a padding row, skipped).
        query_start_loc: ``[B + 1]`` offsets of each sequence's tokens.
        has_initial_state: where False the sequence starts from zeros (None: all True).
    Returns:
        ``[T, Hv, dv]`` float32 (rows of padding sequences are zero).
    """
    out = v.new_zeros(v.shape, dtype=torch.float32)
    for i, slot in enumerate(slot_idx):
        if slot < 0:
            continue
        rows = slice(query_start_loc[i], query_start_loc[i + 1])
        state = states[slot]
        if has_initial_state is not None and not has_initial_state[i]:
            state.zero_()
        out[rows] = gated_delta_chunked(q[rows], k[rows], v[rows], g[rows], beta[rows], state,
                                        chunk_size)  # fmt: skip
    return out
