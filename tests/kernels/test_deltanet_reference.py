"""The torch gated delta rule: the chunked prefill form equals the token-by-token
definition and transformers' own torch fallbacks, from any initial state, for chunk
sizes that do and do not divide the length; the varlen form reads and writes slots."""

from __future__ import annotations

import pytest
import torch

from avmp.kernels import deltanet as ref

transformers_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def inputs(length: int, key_heads: int = 2, value_heads: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    q, k = randn(length, key_heads, 16), randn(length, key_heads, 16)
    v = randn(length, value_heads, 8)
    g = -torch.rand(length, value_heads, generator=generator) * 0.2
    beta = torch.rand(length, value_heads, generator=generator)
    return q, k, v, g, beta


@pytest.mark.parametrize("length,chunk", [(1, 4), (13, 4), (16, 8), (40, 64)])
def test_chunked_equals_recurrent_from_a_state(length: int, chunk: int) -> None:
    q, k, v, g, beta = inputs(length)
    initial = torch.randn(4, 16, 8)
    s_chunk, s_step = initial.clone(), initial.clone()
    y_chunk = ref.gated_delta_chunked(q, k, v, g, beta, s_chunk, chunk)
    y_step = ref.gated_delta_recurrent(q, k, v, g, beta, s_step)
    torch.testing.assert_close(y_chunk, y_step, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_chunk, s_step, rtol=1e-5, atol=1e-5)


def test_matches_transformers_fallbacks() -> None:
    q, k, v, g, beta = inputs(29, seed=3)
    initial = torch.randn(4, 16, 8)
    args = (q[None], k[None], v[None], g[None], beta[None])
    theirs, their_state = transformers_next.torch_chunk_gated_delta_rule(
        *args, chunk_size=8, initial_state=initial[None], output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    state = initial.clone()
    ours = ref.gated_delta_chunked(q, k, v, g, beta, state, 8)
    torch.testing.assert_close(ours, theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, their_state[0], rtol=1e-5, atol=1e-5)
    step_out, step_state = transformers_next.torch_recurrent_gated_delta_rule(
        q[:1, None].transpose(0, 1), k[:1, None].transpose(0, 1), v[:1, None].transpose(0, 1),
        g[:1, None].transpose(0, 1), beta[:1, None].transpose(0, 1),
        initial_state=initial[None], output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    batch_state = initial[None].clone()
    y = ref.gated_delta_step(batch_state, q[:1], k[:1], v[:1], g[:1], beta[:1])
    torch.testing.assert_close(y, step_out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_state, step_state, rtol=1e-5, atol=1e-5)


def test_the_state_carries_the_sequence() -> None:
    """Splitting a sequence in two prefill chunks gives the same outputs as one."""
    q, k, v, g, beta = inputs(21, seed=4)
    whole = torch.zeros(4, 16, 8)
    y = ref.gated_delta_chunked(q, k, v, g, beta, whole, 4)
    split = torch.zeros(4, 16, 8)
    first = ref.gated_delta_chunked(q[:9], k[:9], v[:9], g[:9], beta[:9], split, 4)
    second = ref.gated_delta_chunked(q[9:], k[9:], v[9:], g[9:], beta[9:], split, 4)
    torch.testing.assert_close(torch.cat([first, second]), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(second, ref.gated_delta_chunked(
        q[9:], k[9:], v[9:], g[9:], beta[9:], torch.zeros(4, 16, 8), 4))  # fmt: skip


def test_varlen_reads_and_writes_slots_in_their_dtype() -> None:
    q, k, v, g, beta = inputs(12, seed=5)
    states = torch.randn(5, 4, 16, 8).to(torch.bfloat16)
    before = states.clone()
    out = ref.gated_delta_varlen(
        states, [3, -1, 1], [0, 7, 8, 12], q, k, v, g, beta, has_initial_state=[True, False, False]
    )
    expected_state = before[3].clone()
    expected = ref.gated_delta_chunked(q[:7], k[:7], v[:7], g[:7], beta[:7], expected_state)
    torch.testing.assert_close(out[:7], expected)
    assert torch.equal(states[3], expected_state)
    fresh = torch.zeros(4, 16, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(
        out[8:], ref.gated_delta_chunked(q[8:], k[8:], v[8:], g[8:], beta[8:], fresh)
    )
    assert torch.equal(states[1], fresh)
    assert torch.equal(out[7], torch.zeros(4, 8))  # the padding row
    for untouched in (0, 2, 4):
        assert torch.equal(states[untouched], before[untouched])
