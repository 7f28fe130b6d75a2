"""The layers' Triton kernels: `TritonOps` overrides the reference `Ops` where a kernel
computes the same values in fewer launches.

- norms: every RMS norm (six to ten launches each in torch) in one launch, the residual
  addition before a norm folded into it, Mamba2's gated grouped norm likewise;
- activations: ``silu(gate) * up`` of gated MLPs, and the squared ReLU, one launch each;
- attention over a `DeviceStepBatch`: new K/V stored through the slot mapping (padding
  rows skipped), then decode attention when every sequence computes one token after
  cached context, else the ragged prefill kernel over the step's tile table (which also
  serves decode rows mixed into a prefill step);
- the Mamba2 core over a `DeviceStepBatch`: decode steps run the conv1d update and the
  one-step state update over the step's slots; prefill and mixed steps one varlen causal
  conv launch over every sequence (prefill chunks and decodes, from and into their conv
  slots), then the chunked (SSD) scan over the sequences with prompt tokens and the
  varlen scan over the decode rows, into one output;
- the Mamba1 (Jamba) core likewise: the conv kernels, then the one-token update on
  decode steps and one varlen selective scan over every sequence otherwise.

Each computes the values of the torch code it replaces (same roundings), so the
reference runner and the fast one agree. dt is discretised inside the Mamba2 kernels
exactly as the reference does it in torch (softplus of ``dt + dt_bias`` in the
activations' dtype, clamped to ``time_step_limit``, each step rounded to that dtype).
A plain `StepBatch` (built by the reference runner) carries no device indices: attention
and the Mamba2 core then run the reference code.

Prefill and mixed steps read no host value that differs between steps of one padded
bucket (tile tables and scan plans are built on the device, sized by the step's rows and
sequences), so a CUDA graph can capture them; in a padded step the rows of a mixer's
output that no kernel writes (padding) are zeros, never uninitialised memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from avmp.engine.batch import StepBatch
from avmp.engine.device_batch import DeviceStepBatch
from avmp.engine.ops import Activation, DecodeConv, Ops, OutputAct, relu_squared

if TYPE_CHECKING:
    from avmp.engine.models.layers import Mamba1Mixer, Mamba2Mixer
    from avmp.engine.models.lfm2 import Lfm2ShortConv
    from avmp.engine.models.minimax import LightningAttention
    from avmp.engine.models.qwen3_next import GatedDeltaNet
    from avmp.kernels.triton.causal_conv1d_varlen import ConvTileTable
    from avmp.kernels.triton.mamba2_chunk_scan import ChunkLayout
    from avmp.kernels.triton.skinny_linear import SplitParts


class Mamba2ScanPlan(NamedTuple):
    """How a prefill or mixed step's Mamba2 scan is split, built once per step on the
    device: ``prompt_slots`` (the step's slots, -1 on decode rows) and their chunk table
    ``layout`` for the chunked scan; ``decode_slots`` (-1 except on decode rows) for the
    varlen scan, None when the step has no decode row."""

    layout: ChunkLayout
    prompt_slots: torch.Tensor
    decode_slots: torch.Tensor | None


# `TritonOps.skinny_rows` and `skinny_prefetch` by default (see `fuses_prologue`).
SKINNY_ROWS = 64
SKINNY_PREFETCH_BYTES = 512
# Tile counters of the skinny GEMMs' split-K folding (`skinny_linear`'s ``counters``):
# one per 64 output columns of a linear up to a million wide.
COUNTERS = 1 << 14

# The attribute of a Mamba2 mixer holding its ``A = -exp(A_log)`` (`TritonOps.decay`):
# (A_log parameter, its version, A).
DECAY_ATTRIBUTE = "_triton_decay"


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TritonOps(Ops):
    """The Triton path of the layers' kernels (see the module doc). Needs ``triton``:
    on CUDA, or on the CPU under its interpreter (``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(self) -> None:
        from avmp.kernels import triton as kernels
        from avmp.kernels.triton import (
            _common,
            activations,
            prologue_linear,
            rms_norm,
            skinny_linear,
        )
        from avmp.kernels.triton.conv1d_update import block_channels
        from avmp.kernels.triton.kv_write import kv_write

        self._k = kernels
        self._common = _common
        self._norm = rms_norm
        self._act = activations
        self._pl = prologue_linear
        self._skinny = skinny_linear
        self.prologue_rows = prologue_linear.MAX_ROWS  # 0: norms and activations apart
        # Decode rows above prologue_rows and up to skinny_rows: the norm or activation
        # kernel, then `skinny_linear`, both dependent launches (0: cuBLAS's linear).
        self.skinny_rows = SKINNY_ROWS
        self.skinny_prefetch = SKINNY_PREFETCH_BYTES
        # A split K's parts summed by the last program of each tile (no second kernel),
        # and the Mamba2 decode conv step applied by the in_proj's skinny GEMM as it
        # stores its output (`decode_conv`). Both off: measured slower on an H100
        # (session 23, docs/BENCHMARKS.md); the engine benchmark's "folded" settings.
        self.fold_parts = False
        self.fold_conv = False
        # The MLP activation (SiLU-gated, relu²) applied by the skinny GEMM that computes
        # its input, as it stores it (`OutputAct`): one activation launch fewer per layer.
        self.act_epilogue = True
        # Decode conv steps sized by the batch (`block_channels`: about one wave of
        # programs) rather than 64 channels per program (batch 64 on an H100: Granite
        # 5.20 -> 5.15 ms a step, Nemotron-H 8.84 -> 8.70; session 24, the engine
        # benchmark's "wide_conv" setting).
        self.wide_conv = True
        # Linears whose tiles overrun a whole wave of programs (Granite-4.0-H's in_proj:
        # 133 tiles on 132 SMs) by one program per SM sharing the tiles' K steps
        # equally (`balanced_config`) rather than one program per tile. Off: measured
        # slower on an H100 (session 24: Granite's batch-64 step 5.24 -> 5.34 ms; the
        # engine benchmark's "balanced" setting, `benchmarks/skinny_balanced.py`).
        self.balanced = False
        # A split K's parts of a linear whose output only joins the residual stream
        # summed by the next norm kernel (`SplitParts`, `add_rms_norm`) rather than by a
        # reduce kernel of their own: one launch fewer per such linear (batch 64 on an
        # H100, session 25: Granite 5.16 -> 5.14 and 5.23 -> 5.20 ms a step on two
        # machines, Nemotron-H 8.70 -> 8.70 and 8.92 -> 8.93; the engine benchmark's
        # "defer_sums" setting).
        self.defer_sums = True
        # An attention layer's q, k and v projections as one linear over their stacked
        # weights (`StackedLinears`): one norm and one GEMM (and split-K reduce) a layer
        # instead of three (batch 64 on an H100, session 25: Granite 5.20 -> 5.17 ms a
        # step, Nemotron-H 8.93 -> 8.90; the engine benchmark's "stacked" setting).
        self.stack_linears = True
        # An attention layer's o_proj through `linear` (a skinny GEMM as a dependent
        # launch, its split K left to the next norm where the block allows) rather than
        # cuBLAS: the same step time (5.17 and 8.90 ms, session 25; "attention_out"),
        # one path for every decode linear.
        self.attention_out = True
        # `decode_config`'s long parts: a split K's parts of 16 K steps or more, through
        # six stages (the engine benchmark's "long_parts" setting; off: split while the
        # programs stay within one per SM, four stages). Batch 64 on an H100, session 28:
        # Granite 5.07 -> 5.02 ms a step, Nemotron-H 8.67 -> 8.63.
        self.long_parts = True
        # Tilings that replace `decode_config`'s for a decode linear of (rows, N, K): a
        # tuning table (`benchmarks/skinny_split.py`'s fastest per shape; the engine
        # benchmark's ``--skinny-tuned``). Empty: `decode_config` everywhere.
        self.decode_configs: dict[tuple[int, int, int], Any] = {}
        self._block_channels = block_channels
        self._counters: dict[torch.device, torch.Tensor] = {}
        self.pdl = True  # dependent launches where the GPU has them
        self._kv_write = kv_write

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, fp32_weight: bool = False
    ) -> torch.Tensor:
        return self._norm.rms_norm(x, weight, eps, fp32_weight=fp32_weight)

    def add_rms_norm(
        self,
        x: torch.Tensor,
        delta: torch.Tensor,
        scale: float | None,
        weight: torch.Tensor,
        eps: float,
        fp32_weight: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm.add_rms_norm(x, delta, weight, eps, scale, fp32_weight=fp32_weight)

    def gated_rms_norm(
        self,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        group_size: int,
    ) -> torch.Tensor:
        return self._norm.rms_norm(x, weight, eps, gate, group_size)

    def activation(self, act: Activation, x: torch.Tensor) -> torch.Tensor:
        if act is relu_squared:
            return self._act.relu_squared(x)
        return act(x)

    def glu(self, act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if act is F.silu:
            return self._act.silu_mul(gate, up)
        return self.activation(act, gate) * up

    def fuses_prologue(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        """Decode rows of a float linear with unit-stride weight rows. Up to
        ``prologue_rows``, `avmp.kernels.triton.prologue_linear` computes the norm or
        activation before it in its own prologue (about 150 launches fewer per Granite
        decode step); above, up to ``skinny_rows``, the norm or activation kernel runs,
        then `avmp.kernels.triton.skinny_linear`, both as dependent launches where the
        GPU has them, the GEMM asking L2 for its first weight bytes before it waits."""
        return (
            x.dim() == 2
            and x.shape[0] > 0
            and (x.shape[0] <= self.prologue_rows or self._skinny_rows(x))
            and x.dtype in self._pl.FLOAT_DTYPES
            and weight.dim() == 2
            and weight.dtype == x.dtype
            and weight.stride(1) == 1
            and weight.device == x.device
            and (bias is None or bias.dtype == x.dtype)
        )

    def _hopper(self, device: torch.device) -> bool:
        """Whether ``device`` is a CUDA GPU of compute capability 9.0 or later."""
        return self._common.compute_capability(device)[0] >= 9

    def _pdl(self, device: torch.device) -> bool:
        """Programmatic dependent launch, on Hopper and later: a decode step's prologue
        linears, conv and state update start while the kernel before them finishes
        (a linear reading its first weight tile, `prologue_linear`) and wait for it
        before reading what it wrote."""
        return self.pdl and self._hopper(device)

    def _skinny_rows(self, x: torch.Tensor) -> bool:
        """Rows the skinny GEMM takes: up to ``skinny_rows``, on Hopper or later (where
        it is a dependent launch with TMA loads; elsewhere cuBLAS is as fast) or on the
        CPU under Triton's interpreter (tests)."""
        return x.shape[0] <= self.skinny_rows and (x.device.type == "cpu" or self._hopper(x.device))

    def _prologue(self, x: torch.Tensor) -> bool:
        """Whether rows ``x`` (that `fuses_prologue` took) run as one prologue kernel."""
        return x.shape[0] <= self.prologue_rows

    def _linear(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pdl: bool,
        conv: DecodeConv | None = None,
        act: OutputAct | None = None,
        residual: bool = False,
    ) -> torch.Tensor | SplitParts:
        """``linear(h)`` over decode rows by `skinny_linear` (`decode_config`'s tiling),
        applying ``conv`` to its output where it can (a split K needs the counters), or
        ``act`` (`_act_epilogue`). ``residual``: the output is only added to the
        residual stream, whose next norm sums a split K's parts (`SplitParts`) when
        ``defer_sums`` is on and that norm runs on its own (rows above
        ``prologue_rows``)."""
        sk = self._skinny
        if act is not None and self.act_epilogue:
            out = self._act_epilogue(h, weight, bias, pdl, act)
            if out is not None:
                return out
        shape = (h.shape[0], weight.shape[0], h.shape[1], sk.num_sms(h.device),
                 h.element_size())  # fmt: skip
        config = self._decode_config(*shape)
        counters = None
        balanced = sk.balanced_config(*shape) if self.balanced and conv is None else None
        if balanced is not None:
            counters = self._tile_counters(h.device, sk.tiles(h.shape[0], weight.shape[0],
                                                              balanced))  # fmt: skip
            if counters is not None:
                config = balanced
        elif (self.fold_parts or conv is not None) and config.split_k > 1:
            counters = self._tile_counters(h.device, sk.tiles(h.shape[0], weight.shape[0],
                                                              config))  # fmt: skip
        if (residual and self.defer_sums and counters is None and conv is None
                and not self._prologue(h) and sk.splits_k(h.shape[1], config)):  # fmt: skip
            return sk.skinny_parts(h, weight, bias, config, pdl=pdl,
                                   prefetch_bytes=self.skinny_prefetch if pdl else 0)  # fmt: skip
        epilogue = None
        if conv is not None and (config.split_k == 1 or counters is not None):
            epilogue = sk.ConvEpilogue(conv.state, conv.slot_idx, conv.weight, conv.bias,
                                       conv.start)  # fmt: skip
            conv.applied = True
        return sk.skinny_linear(
            h, weight, bias, config, pdl=pdl, prefetch_bytes=self.skinny_prefetch if pdl else 0,
            counters=counters, conv=epilogue,
        )  # fmt: skip

    def _decode_config(self, m: int, n: int, k: int, num_sms: int, element_size: int) -> Any:
        """The tiling of a decode linear of ``m`` rows and an ``[n, k]`` weight:
        ``decode_configs``' where it names the shape, else `decode_config`'s."""
        tuned = self.decode_configs.get((m, n, k))
        return tuned or self._skinny.decode_config(m, n, k, num_sms, element_size,
                                                   self.long_parts)  # fmt: skip

    def _tile_counters(self, device: torch.device, tiles: int) -> torch.Tensor | None:
        """The skinny GEMMs' tile counters on ``device`` (zeros between calls), made by
        the first call outside a graph capture (a warm-up step); None while there are
        none yet or fewer than ``tiles``."""
        counters = self._counters.get(device)
        if counters is None and not _capturing(device):
            counters = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
            self._counters[device] = counters
        return counters if counters is not None and counters.numel() >= tiles else None

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
        pdl = self._pdl(x.device)
        if isinstance(delta, self._skinny.SplitParts) and self._prologue(x):
            delta = delta.total(pdl)
        if not self._prologue(x):
            if delta is None:
                total, h = x, self._norm.rms_norm(x, norm_weight, eps, fp32_weight=fp32_weight,
                                                  pdl=pdl)  # fmt: skip
            else:
                total, h = self._norm.add_rms_norm(
                    x, delta, norm_weight, eps, scale, fp32_weight=fp32_weight, pdl=pdl
                )
            return total, self._linear(h, weight, bias, pdl, conv, act)
        total, out = self._pl.norm_linear(
            x, norm_weight, eps, weight, bias, delta, scale, fp32_weight, pdl=pdl
        )
        return (x if total is None else total), out

    def _act_epilogue(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pdl: bool,
        act: OutputAct,
    ) -> torch.Tensor | None:
        """``act`` of ``linear(h)`` by the skinny GEMM's epilogue (`ActEpilogue`: gated,
        each program streams a tile of gate rows and the matching up rows of the second
        half), or None where it cannot: another activation than SiLU (gated) or relu²,
        or a K the decode tiling splits (the activation needs whole sums)."""
        sk = self._skinny
        if act.gated and act.act is F.silu and weight.shape[0] % 2 == 0:
            rows = weight.shape[0] // 2
            gate, bias_gate = weight[:rows], None if bias is None else bias[:rows]
            epilogue = sk.ActEpilogue(weight[rows:], None if bias is None else bias[rows:])
        elif not act.gated and act.act is relu_squared:
            rows, gate, bias_gate, epilogue = weight.shape[0], weight, bias, sk.ActEpilogue()
        else:
            return None
        m, k = h.shape
        config = self._decode_config(m, rows, k, sk.num_sms(h.device), h.element_size())
        if sk.splits_k(k, config):
            return None
        act.applied = True
        return sk.skinny_linear(
            h, gate, bias_gate, config, pdl=pdl,
            prefetch_bytes=self.skinny_prefetch if pdl else 0, act=epilogue,
        )  # fmt: skip

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        residual: bool = False,
    ) -> torch.Tensor | SplitParts:
        """Decode rows the skinny GEMM takes (`fuses_prologue`, above ``prologue_rows``)
        by it, as a dependent launch (``residual``: see `_linear`); others by cuBLAS."""
        if self.fuses_prologue(x, weight, bias) and not self._prologue(x):
            return self._linear(x, weight, bias, self._pdl(x.device), residual=residual)
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
    ) -> torch.Tensor | SplitParts:
        pdl = self._pdl(y.device)
        if not self._prologue(y):
            h = self._norm.rms_norm(y, norm_weight, eps, gate, group_size, pdl=pdl)
            return self._linear(h.to(weight.dtype), weight, bias, pdl, residual=residual)
        if not self._pl.tile_fits_groups(y.shape[-1], group_size):
            return super().gated_norm_linear(y, gate, norm_weight, eps, group_size, weight, bias)
        return self._pl.gated_norm_linear(
            y, gate, norm_weight, eps, group_size, weight, bias, pdl=pdl
        )

    def glu_linear(
        self,
        act: Activation,
        gate: torch.Tensor,
        up: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        pdl = self._pdl(gate.device)
        if not self._prologue(gate):
            h = self._act.silu_mul(gate, up, pdl=pdl) if act is F.silu else self.glu(act, gate, up)
            return self._linear(h, weight, bias, pdl and act is F.silu)
        if act is not F.silu:
            return super().glu_linear(act, gate, up, weight, bias)
        return self._pl.act_linear(gate, weight, up, bias, pdl=pdl)

    def act_linear(
        self, act: Activation, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        pdl = self._pdl(x.device)
        if not self._prologue(x):
            h = self._act.relu_squared(x, pdl=pdl) if act is relu_squared else act(x)
            return self._linear(h, weight, bias, pdl and act is relu_squared)
        if act is not relu_squared:
            return super().act_linear(act, x, weight, bias)
        return self._pl.act_linear(x, weight, None, bias, pdl=pdl)

    def decay(self, mixer: Mamba2Mixer) -> torch.Tensor:
        """``A = -exp(A_log)`` in fp32, computed once per weight version (three
        launches per layer and step saved) and kept on the mixer, not here.

        Each engine gives the model a new `TritonOps`, and CUDA graphs captured through
        the old one read its tensors: kept here, a second engine on the same model freed
        them, its next capture returned the memory to the driver, and the first engine's
        next replay was an illegal memory access (benchmarks/engine.py on an H200). On
        the mixer every engine shares one tensor, and a new weight version is written
        into it in place, so the graphs captured with it read the new values.
        """
        a_log = mixer.A_log
        cached = getattr(mixer, DECAY_ATTRIBUTE, None)
        if cached is not None and cached[0] is a_log and cached[1] == a_log._version:
            return cached[2]
        value = -torch.exp(a_log.detach().float())
        if cached is not None:
            old = cached[2]
            if old.shape == value.shape and old.device == value.device:
                value = old.copy_(value)
        setattr(mixer, DECAY_ATTRIBUTE, (a_log, a_log._version, value))
        return value

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
        if not isinstance(batch, DeviceStepBatch):
            return super().attention(q, k, v, k_cache, v_cache, batch, scale)
        self._kv_write(k_cache, v_cache, k, v, batch.slot_mapping)
        q = q.to(k_cache.dtype)
        if batch.is_decode:
            return self._k.decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale
            )
        from avmp.kernels.triton.prefill_attention import (
            attention_tiles,
            launch_tiles,
            query_block,
        )

        # the tile table must cut the queries as the launch does: by its query block
        config = launch_tiles(q, k_cache)
        block = query_block(config, q.shape[1] // k_cache.shape[2])
        tiles = batch.attention_tiles.get(block)
        if tiles is None:
            tiles = attention_tiles(batch.query_start_loc, q.shape[0], block)
            batch.attention_tiles[block] = tiles
        return self._k.prefill_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.query_start_loc,
            batch.context_lens,
            scale,
            batch.max_query_len,
            out=_output_like(q, batch),
            tiles=tiles,
            config=config,
        )

    def decode_conv(
        self, mixer: Mamba2Mixer, batch: StepBatch, conv_states: torch.Tensor
    ) -> DecodeConv | None:
        """A decode step's conv step for the in_proj's skinny GEMM to apply as it stores
        xBC (`avmp.kernels.triton.skinny_linear.ConvEpilogue`): one launch fewer per
        Mamba2 layer. Offered on decode steps of a `DeviceStepBatch` (``fold_conv``);
        applied only where the in_proj runs as a skinny GEMM."""
        if not (self.fold_conv and isinstance(batch, DeviceStepBatch) and batch.is_decode):
            return None
        weight = mixer.conv1d.weight.squeeze(1)
        return DecodeConv(conv_states, batch.slot_idx, weight, mixer.conv1d.bias,
                          mixer.intermediate_size)  # fmt: skip

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
        if not isinstance(batch, DeviceStepBatch):
            return super().mamba2_mix(mixer, xbc, dt, conv_states, ssm_states, batch, conv_done)
        weight = mixer.conv1d.weight.squeeze(1)
        pdl = batch.is_decode and self._pdl(xbc.device)
        if not batch.is_decode:
            xbc = self._prefill_conv(mixer, xbc, weight, conv_states, batch)
        elif not conv_done:  # else the in_proj's epilogue ran it (`decode_conv`)
            block_c = None
            if self.wide_conv:
                block_c = self._block_channels(
                    xbc.shape[0], xbc.shape[1], self._common.num_sms(xbc.device)
                )
            xbc = self._k.conv1d_update(
                conv_states, batch.slot_idx, xbc, weight, mixer.conv1d.bias, "silu", pdl=pdl,
                block_c=block_c,
            )
        n = xbc.shape[0]
        gn = mixer.n_groups * mixer.d_state
        xs, B, C = xbc.split([mixer.intermediate_size, gn, gn], dim=-1)
        xs = xs.reshape(n, mixer.num_heads, mixer.head_dim)
        B = B.reshape(n, mixer.n_groups, mixer.d_state)
        C = C.reshape(n, mixer.n_groups, mixer.d_state)
        A = self.decay(mixer)
        # dt is discretised inside the kernel exactly as the reference does it in torch
        dt_args = dict(
            D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
            dt_limit=mixer.time_step_limit, dt_round=True,
        )  # fmt: skip
        if batch.is_decode:
            y = self._k.mamba2_state_update(
                ssm_states, batch.slot_idx, xs, dt, A, B, C, **dt_args, pdl=pdl
            )
        else:
            y = self._mamba2_prefill_scan(mixer, ssm_states, batch, (xs, dt, A, B, C), dt_args)
        return y.reshape(n, mixer.intermediate_size)

    def _mamba2_prefill_scan(
        self,
        mixer: Mamba2Mixer,
        ssm_states: torch.Tensor,
        batch: DeviceStepBatch,
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        dt_args: dict[str, Any],
    ) -> torch.Tensor:
        """A prefill or mixed step's scan: the chunked (SSD) scan over the sequences with
        prompt tokens, whose time goes to tensor-core products, and the varlen scan over
        the decode rows (one token after cached context), which reads and writes each
        slot once where a chunk of one token would also write and read back a chunk
        state. Both write into one output; ``inputs`` is (x, dt, A, B, C)."""
        plan = batch.mamba2_scan_plans.get(mixer.chunk_size)
        if plan is None:
            plan = self._mamba2_scan_plan(batch, inputs[0].shape[0], mixer.chunk_size)
            batch.mamba2_scan_plans[mixer.chunk_size] = plan
        qsl, init = batch.query_start_loc, batch.has_initial_state
        out = _slot_output_like(inputs[0], batch)
        self._k.mamba2_chunk_scan(
            ssm_states, plan.prompt_slots, qsl, *inputs, mixer.chunk_size,
            has_initial_state=init, out=out, layout=plan.layout, **dt_args,
        )  # fmt: skip
        if plan.decode_slots is not None:
            self._k.mamba2_varlen_scan(
                ssm_states, plan.decode_slots, qsl, *inputs, has_initial_state=init, out=out,
                **dt_args,
            )  # fmt: skip
        return out

    @staticmethod
    def _mamba2_scan_plan(
        batch: DeviceStepBatch, num_tokens: int, chunk_size: int
    ) -> Mamba2ScanPlan:
        """Split the step on the device (no host read, so a captured step can replay it):
        decode rows are the sequences of one token that continue from their slot, as
        `pack_step` marks them; the chunk table is sized by the prompts' tokens and
        sequences alone (the host knows how many decode rows there are). A padded step
        does not say how many: its table is sized by all its rows and sequences, and
        its decode rows' varlen scan always runs (over no row, if there are none)."""
        from avmp.kernels.triton.mamba2_chunk_scan import chunk_layout, max_chunks

        num_decode = 0 if batch.padded else batch.decode_rows.shape[0]
        slots, qsl = batch.slot_idx, batch.query_start_loc
        decode_slots = None
        if num_decode or batch.padded:
            is_decode = (qsl[1:] - qsl[:-1] == 1) & (batch.has_initial_state != 0)
            decode_slots = torch.where(is_decode, slots, -1)
            slots = torch.where(is_decode, -1, slots)
        bound = max_chunks(num_tokens - num_decode, slots.shape[0] - num_decode, chunk_size)
        layout = chunk_layout(qsl, slots, chunk_size, num_tokens, num_chunks=bound)
        return Mamba2ScanPlan(layout, slots, decode_slots)

    def _prefill_conv(
        self,
        mixer: Mamba2Mixer,
        xbc: torch.Tensor,
        weight: torch.Tensor,
        conv_states: torch.Tensor,
        batch: DeviceStepBatch,
    ) -> torch.Tensor:
        """The causal conv of every sequence's new tokens from (and into) its conv slot,
        prefill chunks and decodes alike, in one launch that reads no host value (so a
        mixed step can be captured); a fresh request (``has_initial_state`` 0) starts
        from zeros whatever its slot holds."""
        return self._k.causal_conv1d_varlen(
            xbc,
            conv_states,
            batch.query_start_loc,
            batch.slot_idx,
            batch.has_initial_state,
            weight,
            mixer.conv1d.bias,
            "silu",
            tiles=_conv_tiles(batch, xbc.shape[0]),
        )

    def mamba1_mix(
        self,
        mixer: Mamba1Mixer,
        xs: torch.Tensor,
        gate: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """The Mamba1 (Jamba) core over a `DeviceStepBatch`: the conv1d update (decode)
        or one varlen causal conv (prefill, mixed), Jamba's dt/B/C norms and dt
        projection in torch, then the selective scan from and into every sequence's
        slot with dt's bias, softplus, D and the ``silu(gate)`` gate inside the kernel.
        Decode steps run the one-token update over the step's slots (no host read, so
        a graph can capture it); prefill and mixed steps one varlen scan over every
        sequence, decode rows included."""
        if not isinstance(batch, DeviceStepBatch):
            return super().mamba1_mix(mixer, xs, gate, conv_states, ssm_states, batch)
        from avmp.kernels.triton import mamba1  # needs triton; loaded once, then cached

        weight, bias = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias
        if batch.is_decode:
            xs = self._k.conv1d_update(conv_states, batch.slot_idx, xs, weight, bias, "silu")
        else:
            xs = self._prefill_conv(mixer, xs, weight, conv_states, batch)
        dt, B, C = mixer.normed_projections(xs)
        dt = F.linear(dt, mixer.dt_proj.weight)  # [T, I] rows, as the kernel reads them
        A, D, dt_bias = self.decay(mixer), mixer.D, mixer.dt_proj.bias
        if batch.is_decode:
            return mamba1.mamba1_state_update(
                ssm_states, batch.slot_idx, xs, dt, A, B, C, D, dt_bias, gate
            )
        return mamba1.mamba1_varlen_scan(
            ssm_states, batch.slot_idx, batch.query_start_loc, xs, dt, A, B, C, D, dt_bias,
            gate, has_initial_state=batch.has_initial_state, out=_slot_output_like(xs, batch),
        )  # fmt: skip

    def lightning_mix(
        self, mixer: LightningAttention, qkv: torch.Tensor, states: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """MiniMax's lightning core on the Mamba2 kernels (`avmp.engine.triton_lightning`)."""
        from avmp.engine import triton_lightning  # it imports this module: load on first use

        return triton_lightning.lightning_mix(mixer, qkv, states, batch)

    def gated_delta_mix(
        self,
        mixer: GatedDeltaNet,
        qkv: torch.Tensor,
        ba: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """The Gated DeltaNet core over a `DeviceStepBatch`: the conv1d update (decode)
        or one varlen causal conv (prefill, mixed), then the gated delta rule from and
        into every sequence's slot; g and beta as the reference computes them, in torch.
        Decode steps run the one-token kernel; prefill and mixed steps the chunked form
        over the sequences with prompt tokens and the one-token-per-row kernel over the
        decode rows (see `_gated_delta_prefill`)."""
        if not isinstance(batch, DeviceStepBatch):
            return super().gated_delta_mix(mixer, qkv, ba, conv_states, ssm_states, batch)
        from avmp.kernels.triton import gated_delta  # needs triton; loaded once, then cached

        weight = mixer.conv1d.weight.squeeze(1)
        if batch.is_decode:
            qkv = self._k.conv1d_update(conv_states, batch.slot_idx, qkv, weight, None, "silu")
        else:
            qkv = self._prefill_conv(mixer, qkv, weight, conv_states, batch)
        rule = mixer.rule_inputs(qkv, ba)
        if batch.is_decode:
            y = gated_delta.gated_delta_decode(ssm_states, batch.slot_idx, *rule)
        else:
            y = self._gated_delta_prefill(ssm_states, batch, rule)
        return y.reshape(qkv.shape[0], mixer.value_dim).to(qkv.dtype)

    def _gated_delta_prefill(
        self, ssm_states: torch.Tensor, batch: DeviceStepBatch, rule: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """A prefill or mixed step's delta rule, split as the Mamba2 scan is (the same
        per-step plan, built once for the chunk size and shared by every layer): the
        chunked form over the sequences with prompt tokens, whose time goes to
        tensor-core products, and the sequential kernel over the decode rows, which
        reads and writes each slot once where a chunk of one token would also write and
        read back a chunk start state. ``rule`` is (q, k, v, g, beta)."""
        from avmp.kernels.triton import gated_delta

        chunk = gated_delta.CHUNK_SIZE
        plan = batch.mamba2_scan_plans.get(chunk)
        if plan is None:
            plan = self._mamba2_scan_plan(batch, rule[0].shape[0], chunk)
            batch.mamba2_scan_plans[chunk] = plan
        qsl, init = batch.query_start_loc, batch.has_initial_state
        v = rule[2]
        out = None
        if batch.padded:  # float32, as the kernel's own output
            out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        out = gated_delta.gated_delta_chunked(
            ssm_states, plan.prompt_slots, qsl, *rule, has_initial_state=init, out=out,
            layout=plan.layout, chunk_size=chunk,
        )  # fmt: skip
        if plan.decode_slots is not None:
            gated_delta.gated_delta_varlen(
                ssm_states, plan.decode_slots, qsl, *rule, has_initial_state=init, out=out
            )
        return out

    def short_conv_mix(
        self,
        mixer: Lfm2ShortConv,
        bx: torch.Tensor,
        conv_states: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """LFM2's short convolution on the Mamba conv kernels without activation: the
        conv1d update on decode steps, else one varlen launch over every sequence."""
        if not isinstance(batch, DeviceStepBatch):
            return super().short_conv_mix(mixer, bx, conv_states, batch)
        weight, bias = mixer.conv.weight.squeeze(1), mixer.conv.bias
        if batch.is_decode:
            return self._k.conv1d_update(conv_states, batch.slot_idx, bx, weight, bias, None)
        return self._k.causal_conv1d_varlen(
            bx,
            conv_states,
            batch.query_start_loc,
            batch.slot_idx,
            batch.has_initial_state,
            weight,
            bias,
            None,
            out=_slot_output_like(bx, batch),
            tiles=_conv_tiles(batch, bx.shape[0]),
        )


def _conv_tiles(batch: DeviceStepBatch, num_tokens: int) -> ConvTileTable:
    """The step's tile table of the varlen causal conv, built on the device at its first
    conv layer (no host read, so a captured step rebuilds it on replay) and reused by
    every later one: the work is cut into tiles of tokens, so a long prefill chunk
    among many decodes spreads over as many programs as it has tiles."""
    from avmp.kernels.triton.causal_conv1d_varlen import BLOCK_T, conv_tiles

    tiles = batch.conv_tiles.get(BLOCK_T)
    if tiles is None:
        tiles = conv_tiles(batch.query_start_loc, batch.slot_idx, num_tokens)
        batch.conv_tiles[BLOCK_T] = tiles
    return tiles


def _output_like(x: torch.Tensor, batch: DeviceStepBatch) -> torch.Tensor:
    """A mixer's output buffer: zeros in a padded step, whose padding rows no kernel
    writes (uninitialised, they could hold NaN or Inf that a later layer shared across
    rows, such as expert routing, would spread), else left uninitialised."""
    return torch.zeros_like(x) if batch.padded else torch.empty_like(x)


def _slot_output_like(x: torch.Tensor, batch: DeviceStepBatch) -> torch.Tensor:
    """`_output_like` for a kernel that writes exactly the rows of the sequences with a
    state slot (the recurrent kernels): uninitialised, and in a padded step the other
    rows zeroed alone, not the whole buffer (`zero_slotless_rows`; before the kernel
    runs, which writes none of them)."""
    out = torch.empty_like(x)
    if batch.padded:
        from avmp.kernels.triton.slotless_rows import zero_slotless_rows

        zero_slotless_rows(out, batch.query_start_loc, batch.slot_idx)
    return out
