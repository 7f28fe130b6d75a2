"""The torch reference kernels against direct formulas: paged attention against dense
causal attention, and every recurrent kernel run in pieces (continuing from its state)
against the same kernel or recurrence run in one go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avmp.kernels import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def strided_cache(num_pages: int, block: int, heads: int, dim: int, device: str) -> torch.Tensor:
    """A K cache view strided like a page-major pool (other layers' bytes in between)."""
    pool = torch.zeros(num_pages, 3, block, heads, dim, device=device)
    view = pool[:, 1]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("num_context", "num_query"), [(0, 9), (7, 5), (13, 1)])
def test_paged_attention_matches_dense_causal(
    device: str, num_context: int, num_query: int
) -> None:
    torch.manual_seed(0)
    block, kv_heads, heads, dim = 4, 2, 6, 8
    total = num_context + num_query
    k_cache = strided_cache(16, block, kv_heads, dim, device)
    v_cache = strided_cache(16, block, kv_heads, dim, device)
    pages = torch.tensor([9, 2, 14, 5, 0], device=device)[: -(-total // block)]
    keys = torch.randn(total, kv_heads, dim, device=device)
    values = torch.randn(total, kv_heads, dim, device=device)
    positions = torch.arange(total, device=device)
    ref.write_kv(k_cache, v_cache, keys, values, pages[positions // block], positions % block)
    assert torch.equal(k_cache[pages[1], 2], keys[6]) if total > 6 else True

    query = torch.randn(num_query, heads, dim, device=device)
    out = ref.paged_attention(query, k_cache, v_cache, pages, num_context, scale=0.3)

    k = keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # [H, T, D]
    v = values.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    scores = query.transpose(0, 1) @ k.transpose(1, 2) * 0.3  # [H, Tq, T]
    mask = positions[None, :] <= positions[num_context:, None]
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra_column", [0, 1])
def test_causal_conv1d_in_pieces_matches_one_pass(device: str, extra_column: int) -> None:
    torch.manual_seed(0)
    channels, d_conv, length = 12, 4, 11
    x = torch.randn(length, channels, device=device)
    weight = torch.randn(channels, d_conv, device=device)
    bias = torch.randn(channels, device=device)
    expected = F.silu(
        F.conv1d(x.t()[None], weight[:, None], bias, padding=d_conv - 1, groups=channels)
    )[0, :, :length].t()
    state = torch.full((channels, d_conv - 1 + extra_column), 7.0, device=device)
    state.zero_()  # a new request's slot
    pieces = [ref.causal_conv1d(x[a:b], state, weight, bias) for a, b in [(0, 5), (5, 6), (6, 11)]]
    torch.testing.assert_close(torch.cat(pieces), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[:, -(d_conv - 1) :], x[-(d_conv - 1) :].t())


def mamba2_inputs(device: str, length: int) -> tuple[torch.Tensor, ...]:
    heads, head_dim, groups, d_state = 4, 3, 2, 5
    x = torch.randn(length, heads, head_dim, device=device)
    dt = F.softplus(torch.randn(length, heads, device=device))
    A = -torch.rand(heads, device=device) - 0.1
    B = torch.randn(length, groups, d_state, device=device)
    C = torch.randn(length, groups, d_state, device=device)
    D = torch.randn(heads, device=device)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_chunk_scan_in_pieces_matches_stepwise_recurrence(device: str) -> None:
    torch.manual_seed(0)
    length = 19
    x, dt, A, B, C, D = mamba2_inputs(device, length)
    stepped_state = torch.zeros(1, 4, 3, 5, device=device)
    stepped = [
        ref.mamba2_step(
            stepped_state, x[t : t + 1], dt[t : t + 1], A, B[t : t + 1], C[t : t + 1], D
        )
        for t in range(length)
    ]
    state = torch.zeros(4, 3, 5, device=device)
    pieces = []
    for a, b in [(0, 7), (7, 8), (8, 19)]:  # chunk size 4: padded and partial chunks
        y, state = ref.mamba2_chunk_scan(x[a:b], dt[a:b], A, B[a:b], C[a:b], D, state, 4)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces), torch.cat(stepped), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, stepped_state[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_mamba1_scan_in_pieces_matches_one_pass(device: str) -> None:
    torch.manual_seed(0)
    length, inner, d_state = 10, 6, 4
    x = torch.randn(length, inner, device=device)
    dt = F.softplus(torch.randn(length, inner, device=device))
    A = -torch.rand(inner, d_state, device=device)
    B = torch.randn(length, d_state, device=device)
    C = torch.randn(length, d_state, device=device)
    D = torch.randn(inner, device=device)
    whole_state = torch.zeros(inner, d_state, device=device)
    whole = ref.mamba1_scan(x, dt, A, B, C, D, whole_state)
    state = torch.zeros(inner, d_state, device=device)
    pieces = [
        ref.mamba1_scan(x[a:b], dt[a:b], A, B[a:b], C[a:b], D, state) for a, b in [(0, 3), (3, 10)]
    ]
    torch.testing.assert_close(torch.cat(pieces), whole)
    torch.testing.assert_close(state, whole_state)
    h = torch.zeros(inner, d_state, device=device)  # the recurrence written out
    for t in range(length):
        h = torch.exp(A * dt[t, :, None]) * h + dt[t, :, None] * B[t] * x[t, :, None]
    torch.testing.assert_close(state, h)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_decode_kernels_match_their_one_sequence_forms(device: str) -> None:
    """Decode attention, conv step and Mamba1 step over a batch equal the per-sequence
    kernels, whatever each sequence's length and slot."""
    torch.manual_seed(0)
    block, kv_heads, heads, dim = 4, 2, 4, 8
    k_cache = strided_cache(12, block, kv_heads, dim, device)
    v_cache = strided_cache(12, block, kv_heads, dim, device)
    k_cache.normal_()
    v_cache.normal_()
    tables = [[3, 7, 1], [10], [0, 5]]
    lengths = [11, 2, 8]
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables], device=device)
    query = torch.randn(3, heads, dim, device=device)
    batched = ref.paged_decode_attention(
        query, k_cache, v_cache, padded, torch.tensor(lengths, device=device), 0.4
    )
    for i, (table, length) in enumerate(zip(tables, lengths, strict=True)):
        one = ref.paged_attention(
            query[i : i + 1], k_cache, v_cache, torch.tensor(table, device=device), length - 1, 0.4
        )
        torch.testing.assert_close(batched[i : i + 1], one, rtol=1e-5, atol=1e-5)

    channels, d_conv = 8, 4
    states = torch.randn(5, channels, d_conv - 1, device=device)
    weight, bias = (
        torch.randn(channels, d_conv, device=device),
        torch.randn(channels, device=device),
    )
    x = torch.randn(2, channels, device=device)
    slots = torch.tensor([4, 1], device=device)
    expected_states = states.clone()
    expected = [
        ref.causal_conv1d(x[i : i + 1], expected_states[s], weight, bias)
        for i, s in enumerate([4, 1])
    ]
    out = ref.causal_conv1d_step(x, states, slots, weight, bias)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, expected_states)

    inner, d_state = 6, 3
    ssm = torch.randn(2, inner, d_state, device=device)
    xs, dt = torch.randn(2, inner, device=device), torch.rand(2, inner, device=device)
    A = -torch.rand(inner, d_state, device=device)
    B, C = torch.randn(2, d_state, device=device), torch.randn(2, d_state, device=device)
    D = torch.randn(inner, device=device)
    one_by_one = ssm.clone()
    expected_y = [
        ref.mamba1_scan(
            xs[i : i + 1], dt[i : i + 1], A, B[i : i + 1], C[i : i + 1], D, one_by_one[i]
        )
        for i in range(2)
    ]
    y = ref.mamba1_step(ssm, xs, dt, A, B, C, D)
    torch.testing.assert_close(y, torch.cat(expected_y))
    torch.testing.assert_close(ssm, one_by_one)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_ignores_nan_bytes_past_the_end(device: str) -> None:
    """Unwritten page positions may hold any bytes (a migrated chunk brings the other
    pool's): NaN there must not reach the output."""
    torch.manual_seed(0)
    k_cache = torch.randn(6, 4, 2, 8, device=device)
    v_cache = torch.randn(6, 4, 2, 8, device=device)
    clean_k, clean_v = k_cache.clone(), v_cache.clone()
    tables = torch.tensor([[3, 1], [5, 0]], device=device)
    num_tokens = torch.tensor([6, 2], device=device)
    k_cache[1, 2:] = float("nan")  # sequence 0 holds 6 tokens: page 1 positions 2, 3 unused
    v_cache[1, 2:] = float("nan")
    k_cache[5, 2:] = float("nan")  # sequence 1 holds 2 tokens; page 0 unused entirely
    v_cache[5, 2:] = float("nan")
    v_cache[0] = float("nan")
    query = torch.randn(2, 4, 8, device=device)
    out = ref.paged_decode_attention(query, k_cache, v_cache, tables, num_tokens, 0.3)
    expected = ref.paged_decode_attention(query, clean_k, clean_v, tables, num_tokens, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
