"""MiniMax's lightning attention on the Mamba2 Triton kernels, over a `DeviceStepBatch`.

Lightning attention is the Mamba2 recurrence with ``dt = 1`` (no bias, no softplus),
``A = -slope_h``, ``B = k``, ``C = q``, ``x = v``, one group per head, no ``D``, no gate
(see `avmp.kernels.lightning`, whose slots hold each head's state in Mamba2's
``[heads, head_dim, d_state]`` order). So the Mamba2 kernels run it as they are: decode
steps the one-step state update over the step's slots; prefill and mixed steps the
chunked (SSD) scan over the sequences with prompt tokens and the varlen scan over the
decode rows, split by the step's shared plan (`TritonOps._mamba2_scan_plan`). No kernel
reads a host value, so a graph can capture a decode step.

`TritonOps.lightning_mix` delegates here; a plain `StepBatch` (the reference runner's)
runs the torch reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from avmp.engine.batch import StepBatch
from avmp.engine.device_batch import DeviceStepBatch
from avmp.engine.ops import REFERENCE_OPS
from avmp.engine.triton_ops import TritonOps
from avmp.kernels.triton.mamba2_chunk_scan import mamba2_chunk_scan
from avmp.kernels.triton.mamba2_state_update import mamba2_state_update
from avmp.kernels.triton.mamba2_varlen_scan import mamba2_varlen_scan

if TYPE_CHECKING:
    from avmp.engine.models.minimax import LightningAttention

# Tokens per chunk of the prefill scan. Its fp32 scratch holds the in-chunk products
# ``[T, heads, chunk]`` and the chunk states ``[T / chunk, heads, D, D]``: the two are
# equal at chunk = head_dim, 128 in MiniMax-Text-01 (the model's own block of 256 would
# double the first). The result does not depend on it.
CHUNK_SIZE = 128

# Inputs of the Mamba2 kernels in their order: x, dt, A, B, C.
ScanInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def lightning_mix(
    mixer: LightningAttention,
    qkv: torch.Tensor,
    states: torch.Tensor,
    batch: StepBatch,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """The lightning core of ``qkv [T, 3 * H * D]`` from (and into) each sequence's
    ``states [num_slots, H, D, D]`` entry; fresh requests (``has_initial_state`` 0)
    start from zeros, padding rows (slot -1) are left untouched, output included.
    Returns ``[T, H * D]`` in qkv's dtype: `Ops.lightning_mix`'s values, summed in fp32."""
    if not isinstance(batch, DeviceStepBatch):
        return REFERENCE_OPS.lightning_mix(mixer, qkv, states, batch)
    inputs = scan_inputs(mixer, qkv)
    # [T, H, D], contiguous (v is a strided view). Zeros: no kernel writes a padding
    # row, and uninitialised NaN there would spread through layers that mix rows (the
    # experts' routing); a memset is small beside the states the kernels read.
    out = qkv.new_zeros(inputs[0].shape)
    if batch.is_decode:
        mamba2_state_update(states, batch.slot_idx, *inputs, dt_softplus=False, out=out)
    else:
        _prefill(states, batch, inputs, chunk_size, out)
    return out.view(qkv.shape[0], mixer.num_heads * mixer.head_dim)


def scan_inputs(mixer: LightningAttention, qkv: torch.Tensor) -> ScanInputs:
    """``(v, dt = 1, -slope, k, q)``: q, k, v are ``[T, H, D]`` views of qkv, dt an
    fp32 ``[T, H]`` view of one 1. The slopes are rounded to qkv's dtype first, as the
    reference (and transformers' model in that dtype) rounds them."""
    q, k, v = mixer.split(qkv)
    one = torch.ones((), dtype=torch.float32, device=qkv.device)
    dt = one.expand(qkv.shape[0], mixer.num_heads)
    a = -mixer.slope_rate.to(qkv.dtype).float()
    return v, dt, a, k, q


def _prefill(
    states: torch.Tensor,
    batch: DeviceStepBatch,
    inputs: ScanInputs,
    chunk_size: int,
    out: torch.Tensor,
) -> None:
    """A prefill or mixed step: the chunked scan over the sequences with prompt tokens,
    the varlen scan over the decode rows (one read and one write of each slot, where a
    chunk of one token would also write and read back a chunk state), both into ``out``.
    The split is the step's plan for ``chunk_size``, built once on the device and
    shared with any other layer scanning in chunks of that size."""
    num_tokens = inputs[0].shape[0]
    plan = batch.mamba2_scan_plans.get(chunk_size)
    if plan is None:
        plan = TritonOps._mamba2_scan_plan(batch, num_tokens, chunk_size)
        batch.mamba2_scan_plans[chunk_size] = plan
    qsl, init = batch.query_start_loc, batch.has_initial_state
    mamba2_chunk_scan(
        states, plan.prompt_slots, qsl, *inputs, chunk_size, has_initial_state=init, out=out,
        layout=plan.layout, dt_softplus=False,
    )  # fmt: skip
    if plan.decode_slots is not None:
        mamba2_varlen_scan(
            states, plan.decode_slots, qsl, *inputs, has_initial_state=init, out=out,
            dt_softplus=False,
        )  # fmt: skip
