"""The Triton kernels agree with the engine's torch reference kernels
(``avmp.kernels.reference``) in fp32 on the same strided pool views, so the engine can
switch between them: same conventions for positions, conv columns and dt."""

from __future__ import annotations

import torch
from _triton_cases import assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels import reference  # noqa: E402
from avmp.kernels.triton import (  # noqa: E402
    conv1d_update,
    decode_attention,
    mamba2_state_update,
    prefill_attention,
)

F32 = torch.float32


def _paged(gen: torch.Generator, ctx: list[int], block_size: int) -> tuple[torch.Tensor, ...]:
    max_pages = max(-(-c // block_size) for c in ctx)
    num_pages = len(ctx) * max_pages
    k, v = strided_views((num_pages, block_size, 2, 16), 2, F32, DEVICE, gen, True)
    bt = torch.randperm(num_pages, generator=gen).int().view(len(ctx), max_pages).to(DEVICE)
    return k, v, bt


def test_attention_matches_reference_paged_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    q_lens, cached, block_size = [6, 1, 13], [10, 0, 3], 4
    ctx = [c + n for c, n in zip(cached, q_lens, strict=True)]
    k, v, bt = _paged(gen, ctx, block_size)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen).to(DEVICE)
    qsl = torch.tensor([0, 6, 7, 20], dtype=torch.int32, device=DEVICE)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k, v, bt, qsl, ctx_t, 0.25, max(q_lens))
    starts = qsl.tolist()
    ref = torch.cat([
        reference.paged_attention(q[starts[b] : starts[b + 1]], k, v,
                                  bt[b, : -(-ctx[b] // block_size)].long(), cached[b], 0.25)
        for b in range(3)
    ])
    assert_close("prefill vs reference", out, ref, F32)
    last = qsl[1:].long() - 1  # each request's last token is a decode query
    decoded = decode_attention(q[last], k, v, bt, ctx_t, 0.25)
    assert_close("decode vs reference", decoded, ref[last], F32)


def test_conv_update_matches_reference_causal_conv1d() -> None:
    gen = torch.Generator().manual_seed(1)
    state, _ = strided_views((5, 24, 3), 2, F32, DEVICE, gen, True)
    slots = [3, 0, 4]
    x = torch.randn(3, 24, generator=gen).to(DEVICE)
    weight = torch.randn(24, 4, generator=gen).to(DEVICE)
    bias = torch.randn(24, generator=gen).to(DEVICE)
    ref_state = state.clone()
    ref = torch.cat([reference.causal_conv1d(x[b : b + 1], ref_state[s], weight, bias)
                     for b, s in enumerate(slots)])
    out = conv1d_update(state, torch.tensor(slots, dtype=torch.int32, device=DEVICE), x,
                        weight, bias)
    assert_close("conv vs reference", out, ref, F32)
    assert torch.equal(state, ref_state)


def test_state_update_matches_reference_mamba2_step() -> None:
    gen = torch.Generator().manual_seed(2)
    _, state = strided_views((6, 4, 8, 16), 2, F32, DEVICE, gen, True)
    slots = torch.tensor([5, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(2, 4, 8, generator=gen).to(DEVICE)
    dt = torch.nn.functional.softplus(torch.randn(2, 4, generator=gen)).to(DEVICE)
    A = -torch.rand(4, generator=gen).add(0.5).to(DEVICE)
    B, C = (torch.randn(2, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    D = torch.randn(4, generator=gen).to(DEVICE)
    gathered = state[slots.long()]
    ref = reference.mamba2_step(gathered, x, dt, A, B, C, D)
    out = mamba2_state_update(state, slots, x, dt, A, B, C, D=D, dt_softplus=False)
    assert_close("mamba2 vs reference", out, ref, F32)
    assert_close("state vs reference", state[slots.long()], gathered, F32)
