"""Lightning attention on the Mamba2 Triton kernels (`avmp.engine.triton_lightning`)
against the torch reference `Ops.lightning_mix`, step by step over one strided pool:
ragged prefill around the chunk size (fresh and continuing slots), prompts split over
steps, decode steps with padding rows, mixed steps (decode rows beside prompt chunks and
padding), fp32 and bf16 activations and states; on CUDA also a captured decode step.

The reference blocks tokens by the layer's ``block_size`` (8 here), the kernels chunk by
16: the boundaries differ, the function does not. Tolerances (`_triton_cases.TOLERANCE`):
fp32 1e-4 (the same products summed in another order); with bf16 activations the
reference runs on the same bf16 values upcast to fp32 (its native bf16 path rounds every
intermediate; the kernels accumulate in fp32), slopes rounded to bf16 as both round them,
and 2e-2 covers the bf16 tensor-core operands on the GPU and a bf16 state's rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from _triton_cases import TOLERANCE, assert_close, strided_views

from triton_device import kernel_device

DEVICE = kernel_device()

import transformers  # noqa: E402

from avmp.engine.batch import StepBatch  # noqa: E402
from avmp.engine.device_batch import (  # noqa: E402
    DeviceStepBatch,
    StepShape,
    device_batch,
    pack_step,
    split_packed,
)
from avmp.engine.models.minimax import LightningAttention  # noqa: E402
from avmp.engine.ops import REFERENCE_OPS  # noqa: E402
from avmp.engine.runner import SequenceWork  # noqa: E402
from avmp.engine.triton_lightning import lightning_mix  # noqa: E402

H, D, NUM_SLOTS, CHUNK = 2, 16, 6, 16
PAGE_TOKENS = 64  # attention is not run: one page covers every test sequence


class Seq(NamedTuple):
    """One sequence's share of a step: new tokens after ``context`` cached ones."""

    slot: int
    context: int
    tokens: int


def make_mixer(dtype: torch.dtype) -> LightningAttention:
    config = transformers.MiniMaxConfig(
        hidden_size=32, num_attention_heads=H, head_dim=D, block_size=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_hidden_layers=3,
    )  # fmt: skip
    mixer = LightningAttention(config, 0).to(DEVICE)
    if dtype != torch.float32:  # slopes both paths see alike (see the module doc)
        mixer.slope_rate.copy_(mixer.slope_rate.to(dtype).float())
    return mixer


def make_step(seqs: list[Seq], num_seqs: int | None = None) -> DeviceStepBatch:
    """The engine's packed step for ``seqs``, padded to ``num_seqs`` sequences (one
    padding token each: slot -1, context 0)."""
    work = [SequenceWork([1] * s.tokens, s.context, s.slot, [0], True) for s in seqs]
    num_seqs = num_seqs or len(seqs)
    num_tokens = sum(s.tokens for s in seqs) + num_seqs - len(seqs)
    shape = StepShape(num_tokens, num_seqs, 1, num_seqs)
    packed = np.zeros(shape.total, dtype=np.int64)
    pack_step(work, PAGE_TOKENS, packed, shape)
    fields = split_packed(torch.from_numpy(packed).to(DEVICE), shape)
    is_decode = num_tokens == num_seqs and all(s.tokens == 1 and s.context for s in seqs)
    return device_batch(fields, work, PAGE_TOKENS, is_decode)


def random_qkv(num_tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, 3 * H * D, generator=generator) * 0.5
    return qkv.to(dtype).to(DEVICE)


def make_pools(state_dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random states in two strided, non-contiguous pool views."""
    generator = torch.Generator().manual_seed(seed)
    (ours,) = strided_views((NUM_SLOTS, H, D, D), 1, state_dtype, DEVICE, generator,
                            permute_inner=True)  # fmt: skip
    (theirs,) = strided_views((NUM_SLOTS, H, D, D), 1, state_dtype, DEVICE, generator,
                              permute_inner=True)  # fmt: skip
    theirs.copy_(ours)
    return ours, theirs


def run_steps(
    steps: list[tuple[list[Seq], int | None]], dtype: torch.dtype, state_dtype: torch.dtype
) -> None:
    """Each step through both paths on its own copy of one pool: the real rows' outputs
    after every step and the whole pool at the end agree; slots no step names keep
    their bytes."""
    mixer = make_mixer(dtype)
    ours, theirs = make_pools(state_dtype, seed=1)
    before = ours.clone()
    coarser = max(dtype, state_dtype, key=lambda d: TOLERANCE[d])
    for i, (seqs, num_seqs) in enumerate(steps):
        batch = make_step(seqs, num_seqs)
        qkv = random_qkv(batch.num_tokens, dtype, seed=10 + i)
        out = lightning_mix(mixer, qkv, ours, batch, chunk_size=CHUNK)
        expected = REFERENCE_OPS.lightning_mix(mixer, qkv.float(), theirs, batch)
        real = sum(s.tokens for s in seqs)
        assert out.dtype == dtype and out.shape == (batch.num_tokens, H * D)
        assert_close(f"step {i} output", out[:real], expected[:real], coarser)
    assert_close("states", ours, theirs, coarser)
    named = {s.slot for seqs, _ in steps for s in seqs}
    kept = [s for s in range(NUM_SLOTS) if s not in named]
    assert torch.equal(ours[kept], before[kept])


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_ragged_prefill_around_the_chunk_size(dtype: torch.dtype, state_dtype: torch.dtype) -> None:
    """1, chunk - 1, chunk, chunk + 1 and several chunks, fresh and continuing."""
    seqs = [Seq(4, 0, 1), Seq(0, 3, 15), Seq(2, 0, 16), Seq(5, 7, 17), Seq(1, 0, 40)]
    run_steps([(seqs, None)], dtype, state_dtype)


def test_split_prompts_then_decode_steps_with_padding() -> None:
    """Two prompts prefilled over two steps, then decode steps padded to four rows (the
    graph sizes' padding: slot -1, context 0), a request finishing in between."""
    steps: list[tuple[list[Seq], int | None]] = [
        ([Seq(3, 0, 21), Seq(1, 0, 4)], None),
        ([Seq(3, 21, 16), Seq(1, 4, 7)], None),
        ([Seq(3, 37, 1), Seq(1, 11, 1)], 4),
        ([Seq(1, 12, 1)], 4),
    ]
    run_steps(steps, torch.float32, torch.float32)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mixed_steps_decode_rows_beside_prompt_chunks(state_dtype: torch.dtype) -> None:
    """Decode rows (one token after context) between prompt chunks, a fresh one-token
    prompt (not a decode row: it starts from zeros), and padding sequences."""
    steps: list[tuple[list[Seq], int | None]] = [
        ([Seq(0, 0, 9), Seq(4, 0, 20)], None),
        ([Seq(0, 9, 1), Seq(2, 0, 1), Seq(4, 20, 18), Seq(5, 0, 3)], 6),
        ([Seq(4, 38, 1), Seq(0, 10, 1), Seq(2, 1, 1), Seq(5, 3, 1)], None),
    ]
    run_steps(steps, torch.bfloat16 if state_dtype == torch.bfloat16 else torch.float32,
              state_dtype)  # fmt: skip


def test_a_reference_batch_runs_the_reference() -> None:
    """A plain `StepBatch` (the reference runner's) carries no device indices."""
    mixer = make_mixer(torch.float32)
    ours, theirs = make_pools(torch.float32, seed=2)
    batch = StepBatch.build([(0, 5, 1, [0]), (4, 1, 3, [0])], PAGE_TOKENS, DEVICE)
    qkv = random_qkv(6, torch.float32, seed=3)
    out = lightning_mix(mixer, qkv, ours, batch)
    assert torch.equal(out, REFERENCE_OPS.lightning_mix(mixer, qkv, theirs, batch))
    assert torch.equal(ours, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need CUDA")
def test_a_captured_decode_step_replays_with_new_slots_and_inputs() -> None:
    """No host read: a graph captured on one decode step gives the reference's values
    when replayed with other slots, other contexts and other inputs."""
    mixer = make_mixer(torch.float32)
    ours, theirs = make_pools(torch.float32, seed=4)
    batch = make_step([Seq(0, 5, 1), Seq(1, 3, 1)], 4)
    qkv = random_qkv(4, torch.float32, seed=5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        lightning_mix(mixer, qkv, ours, batch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lightning_mix(mixer, qkv, ours, batch)
    fresh = make_step([Seq(4, 9, 1), Seq(2, 1, 1), Seq(5, 30, 1)], 4)
    for name in ("slot_idx", "has_initial_state", "query_start_loc", "context_lens"):
        getattr(batch, name).copy_(getattr(fresh, name))
    ours.copy_(theirs)  # the warm-up ran a step: start both from the same pool
    qkv.copy_(random_qkv(4, torch.float32, seed=6))
    graph.replay()
    expected = REFERENCE_OPS.lightning_mix(mixer, qkv, theirs, fresh)
    assert_close("output", out[:3], expected[:3], torch.float32)
    assert_close("states", ours, theirs, torch.float32)
