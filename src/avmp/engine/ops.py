"""The kernels a layer runs, chosen once per model: `Ops` is the torch reference, and
`avmp.engine.triton_ops.TritonOps` overrides it with Triton kernels.

Every layer that has a kernel choice holds one `Ops` as ``layer.ops`` (the reference
until `HybridModel.use_ops` hands every layer another, which the engine does once, at
construction) and calls it by name: ``self.ops.rms_norm(...)``. The ops take tensors
and plain values, never the layer, except the Mamba2 core, which reads the mixer's
weights and, on the reference path, its own prefill and decode steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from avmp.engine.batch import StepBatch
from avmp.kernels import reference as ref

if TYPE_CHECKING:
    from avmp.engine.models.layers import Mamba1Mixer, Mamba2Mixer
    from avmp.engine.models.lfm2 import Lfm2ShortConv
    from avmp.engine.models.minimax import LightningAttention
    from avmp.engine.models.qwen3_next import GatedDeltaNet

Activation = Callable[[torch.Tensor], torch.Tensor]


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


@dataclass
class DecodeConv:
    """A Mamba2 decode step's conv step (SiLU), offered to the linear before it (the
    mixer's in_proj): ops that compute that linear's output columns ``[start, start +
    channels)`` may apply the step there as they store them and set ``applied``; the
    mixer's core then does not run it again (`Ops.decode_conv`).

    ``state``: the layer's conv states ``[slots, channels, columns]``; ``slot_idx``: each
    row's slot (negative: padding); ``weight``: ``[channels, d_conv]``.
    """

    state: torch.Tensor
    slot_idx: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int
    applied: bool = False


@dataclass
class OutputAct:
    """An MLP activation offered to the linear that feeds it (Granite-4.0-H's
    input_linear, Nemotron-H's up_proj): ops that can apply it to that linear's output as
    they store it do so and set ``applied``; the output is then ``act(a) * b`` of its two
    halves of features (``gated``) or ``act(out)``, the values the activation would give
    on the stored output, and the layer runs the next linear on it (`Ops.linear`)."""

    act: Activation
    gated: bool
    applied: bool = False


class Ops:
    """The torch reference kernels of the engine's layers: what the CPU runs, and what
    every other implementation must compute."""

    name = "reference"
    # Whether layers run linears over one input as one linear where their weights are
    # stacked (`avmp.engine.models.layers.StackedLinears`).
    stack_linears = False
    # Whether attention layers run their output projection through `linear` (else the
    # module, cuBLAS).
    attention_out = False

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, fp32_weight: bool = False
    ) -> torch.Tensor:
        """RMS norm in float32; ``fp32_weight`` multiplies before the cast back
        (Nemotron-H), else after it (Llama style)."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if fp32_weight:
            return (weight.float() * h).to(dtype)
        return weight * h.to(dtype)

    def add_rms_norm(
        self,
        x: torch.Tensor,
        delta: torch.Tensor,
        scale: float | None,
        weight: torch.Tensor,
        eps: float,
        fp32_weight: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta * scale`` and the RMS norm of ``s``."""
        total = x + (delta if scale is None else delta * scale)
        return total, self.rms_norm(total, weight, eps, fp32_weight)

    def gated_rms_norm(
        self,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        group_size: int,
    ) -> torch.Tensor:
        """Grouped RMS norm of ``x * silu(gate)`` (of ``x`` without a gate)."""
        dtype = x.dtype
        h = x.float()
        if gate is not None:
            h = h * F.silu(gate.float())
        grouped = h.view(*h.shape[:-1], -1, group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
        out: torch.Tensor = weight * grouped.view(h.shape).to(dtype)
        return out

    def activation(self, act: Activation, x: torch.Tensor) -> torch.Tensor:
        """``act(x)``."""
        return act(x)

    def glu(self, act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up``."""
        return self.activation(act, gate) * up

    # -- a linear layer with the norm or activation before it (decode rows) -------------
    #
    # A layer asks `fuses_prologue` first; where it says no, the layer runs its norm or
    # activation and then its linear module. The methods below compute what that
    # composition computes; `TritonOps` computes it in one kernel per linear.

    def fuses_prologue(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        """Whether ``linear(f(x))`` runs as one kernel here (f: a norm or activation)."""
        return False

    def norm_linear(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        scale: float | None,
        norm_weight: torch.Tensor,
        eps: float,
        fp32_weight: bool,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: DecodeConv | None = None,
        act: OutputAct | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta * scale`` (``x`` without a delta) and ``linear(rms_norm(s))``
        (``conv``, ``act``: a conv step or an activation these ops may apply to the
        output, `DecodeConv`, `OutputAct`; the reference never does)."""
        if delta is None:
            total, h = x, self.rms_norm(x, norm_weight, eps, fp32_weight)
        else:
            total, h = self.add_rms_norm(x, delta, scale, norm_weight, eps, fp32_weight)
        return total, F.linear(h, weight, bias)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        residual: bool = False,
    ) -> Any:
        """``linear(x)`` (after an `OutputAct` applied: the next linear). ``residual``:
        the output only joins the residual stream (`Residual.add`), so the ops may
        return it as a value the stream's next norm finishes (the Triton ops' split-K
        parts); here a tensor."""
        return F.linear(x, weight, bias)

    def gated_norm_linear(
        self,
        y: torch.Tensor,
        gate: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        group_size: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        residual: bool = False,
    ) -> Any:
        """``linear(gated_rms_norm(y, gate))``, the norm's output in the weight's dtype
        (``residual``: as in `linear`)."""
        h = self.gated_rms_norm(y, gate, norm_weight, eps, group_size)
        return F.linear(h.to(weight.dtype), weight, bias)

    def glu_linear(
        self,
        act: Activation,
        gate: torch.Tensor,
        up: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """``linear(act(gate) * up)``."""
        return F.linear(self.glu(act, gate, up), weight, bias)

    def act_linear(
        self, act: Activation, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``linear(act(x))``."""
        return F.linear(self.activation(act, x), weight, bias)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        """Write the new K/V ``[T, kv_heads, D]`` into their pages, then attend each
        prefill chunk over its pages and all decode tokens in one batched call.
        Returns ``[T, heads, D]``."""
        ref.write_kv(k_cache, v_cache, k, v, batch.page_ids, batch.page_offsets)
        out = torch.empty_like(q)
        for seq in batch.per_sequence:
            out[seq.tokens] = ref.paged_attention(
                q[seq.tokens], k_cache, v_cache, seq.block_table, seq.num_context, scale
            )
        decode = batch.decode
        if decode is not None:
            out[decode.token_index] = ref.paged_decode_attention(
                q[decode.token_index],
                k_cache,
                v_cache,
                decode.block_tables,
                decode.num_tokens,
                scale,
            )
        return out

    def decode_conv(
        self, mixer: Mamba2Mixer, batch: StepBatch, conv_states: torch.Tensor
    ) -> DecodeConv | None:
        """The conv step of ``mixer``'s decode step, for its in_proj to apply where these
        ops can (`DecodeConv`); None: the core runs it (the reference always)."""
        return None

    def mamba2_mix(
        self,
        mixer: Mamba2Mixer,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        batch: StepBatch,
        conv_done: bool = False,
    ) -> torch.Tensor:
        """The Mamba2 core: conv then chunked scan per prefill chunk, one batched conv
        step and state step for all decode tokens. Returns ``[T, intermediate]``.
        ``conv_done``: the decode conv step was applied already (only where these ops'
        `decode_conv` offered it and their linear applied it)."""
        if conv_done:
            raise ValueError("the reference ops apply no conv step in a linear")
        width = mixer.intermediate_size
        return run_recurrent(mixer, xbc, dt, width, batch, conv_states, ssm_states)

    def mamba1_mix(
        self,
        mixer: Mamba1Mixer,
        xs: torch.Tensor,
        gate: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """The Mamba1 (Jamba) core of ``xs [T, I]`` gated by ``silu(gate)``: conv then
        selective scan per prefill chunk, one batched conv step and state step for all
        decode tokens. Returns ``[T, I]`` in xs's dtype."""
        width = mixer.intermediate_size
        return run_recurrent(mixer, xs, gate, width, batch, conv_states, ssm_states)

    def gated_delta_mix(
        self,
        mixer: GatedDeltaNet,
        qkv: torch.Tensor,
        ba: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """The Gated DeltaNet core: conv then the chunked delta rule per prefill chunk,
        one batched conv step and rule step for all decode tokens. ``ba`` holds b then a
        per token. Returns ``[T, Hv * dv]``."""
        width = mixer.value_dim
        return run_recurrent(mixer, qkv, ba, width, batch, conv_states, ssm_states)

    def short_conv_mix(
        self,
        mixer: Lfm2ShortConv,
        bx: torch.Tensor,
        conv_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """LFM2's short convolution (no activation) of ``bx [T, hidden]``: per prefill
        chunk from its conv slot, one batched step for all decode tokens."""
        no_ssm = conv_states.new_empty((conv_states.shape[0], 0))
        return run_recurrent(mixer, bx, bx, mixer.conv_dim, batch, conv_states, no_ssm)

    def lightning_mix(
        self,
        mixer: LightningAttention,
        qkv: torch.Tensor,
        states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """MiniMax's lightning attention of ``qkv [T, 3 * H * D]`` (each head's q, k, v
        side by side): blockwise per prefill chunk from its state, one recurrent step
        for all decode tokens. Returns ``[T, H * D]``."""
        no_conv = states.new_empty((states.shape[0], 0))
        width = mixer.num_heads * mixer.head_dim
        return run_recurrent(mixer, qkv, qkv, width, batch, no_conv, states)


REFERENCE_OPS = Ops()


def run_recurrent(
    mixer: Any,
    first: torch.Tensor,
    second: torch.Tensor,
    width: int,
    batch: StepBatch,
    conv_states: torch.Tensor,
    ssm_states: torch.Tensor,
) -> torch.Tensor:
    """A recurrent mixer's core over a step (reference path): each prefill chunk through
    ``mixer.prefill`` from (and into) its slot, every decode token in one batched
    ``mixer.decode``. ``first`` and ``second`` are the mixer's two per-token inputs
    (Mamba2: conv input and dt; Mamba1: conv input and gate); returns ``[T, width]``."""
    out = first.new_empty(first.shape[0], width)
    for seq in batch.per_sequence:
        index = seq.tokens
        if seq.is_decode:  # a batch built without a decode group
            slot = torch.tensor([seq.slot], device=first.device)
            out[index] = mixer.decode(first[index], second[index], conv_states, ssm_states, slot)
            continue
        conv, ssm = conv_states[seq.slot], ssm_states[seq.slot]
        if seq.num_context == 0:  # a new or recomputed request: its slot holds stale bytes
            conv.zero_()
            ssm.zero_()
        out[index] = mixer.prefill(first[index], second[index], conv, ssm)
    decode = batch.decode
    if decode is not None:
        rows = decode.token_index
        out[rows] = mixer.decode(first[rows], second[rows], conv_states, ssm_states, decode.slots)
    return out
