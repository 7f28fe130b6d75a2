"""The lightning-attention reference: the blockwise prefill equals the token-by-token
recurrence from any state, across block sizes and prompts split over calls, and the
varlen entry keeps every sequence to its own slot."""

from __future__ import annotations

import pytest
import torch

from avmp.kernels import lightning

transformers = pytest.importorskip("transformers")

H, D = 3, 8


def qkv(num_tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(num_tokens, H, D, generator=generator) for _ in range(3))


def recurrence(q, k, v, slope, state):  # type: ignore[no-untyped-def]
    """Token by token through `lightning_step` (one sequence in slot 0)."""
    states = state[None].clone()
    slots = torch.tensor([0])
    out = [lightning.lightning_step(states, slots, q[t : t + 1], k[t : t + 1], v[t : t + 1], slope)
           for t in range(q.shape[0])]  # fmt: skip
    return torch.cat(out), states[0]


@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
@pytest.mark.parametrize("splits", [[19], [5, 1, 13], [8, 8, 3]])
def test_prefill_matches_recurrence(block_size: int, splits: list[int]) -> None:
    q, k, v = qkv(sum(splits), seed=0)
    slope = lightning.slope_rates(H, layer_index=1, num_layers=4)
    start_state = torch.randn(H, D, D, generator=torch.Generator().manual_seed(9))
    expected, expected_state = recurrence(q, k, v, slope, start_state)
    state = start_state.clone()
    outs, offset = [], 0
    for n in splits:  # a prompt prefilled over several steps continues from its state
        rows = slice(offset, offset + n)
        outs.append(
            lightning.lightning_prefill(q[rows], k[rows], v[rows], slope, state, block_size)
        )
        offset += n
    torch.testing.assert_close(torch.cat(outs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


def test_decay_weights_tokens_by_distance() -> None:
    """One head, unit vectors: token d positions back contributes exp(-s d)."""
    slope = torch.tensor([0.3])
    q = torch.ones(4, 1, 1)
    k = torch.ones(4, 1, 1)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(4, 1, 1)
    out = lightning.lightning_prefill(q, k, v, slope, torch.zeros(1, 1, 1), block_size=2)
    expected = torch.exp(-0.3 * torch.arange(4.0)).view(4, 1, 1)
    torch.testing.assert_close(out, expected)


def test_varlen_reads_and_writes_only_its_slots() -> None:
    q, k, v = qkv(9, seed=1)
    slope = lightning.slope_rates(H, layer_index=0, num_layers=2)
    states = torch.randn(4, H, D, D, generator=torch.Generator().manual_seed(3))
    before = states.clone()
    slots = torch.tensor([3, 1])
    starts = torch.tensor([0, 6, 9])
    fresh = torch.tensor([False, True])  # slot 3 restarts from zeros; slot 1 continues
    out = lightning.lightning_varlen(q, k, v, slope, states, slots, starts, fresh, block_size=4)
    first, state3 = recurrence(q[:6], k[:6], v[:6], slope, torch.zeros(H, D, D))
    second, state1 = recurrence(q[6:], k[6:], v[6:], slope, before[1])
    torch.testing.assert_close(out, torch.cat([first, second]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[3], state3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1], state1, rtol=1e-5, atol=1e-5)
    assert torch.equal(states[0], before[0]) and torch.equal(states[2], before[2])


@pytest.mark.parametrize("layer_index", [0, 2, 5])
def test_slopes_are_transformers(layer_index: int) -> None:
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = transformers.MiniMaxConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=6, head_dim=8
    )
    theirs = MiniMaxLightningAttention(config, layer_index).get_slope_rate().flatten()
    torch.testing.assert_close(lightning.slope_rates(4, layer_index, 6), theirs)
