"""Which kernels a layer runs on a device: the torch reference kernels, or the Triton
kernels reading the AVMP views through device index tensors.

The fast runner (``avmp.engine.fast_runner``) binds each attention layer's ``attend``
and each Mamba2 mixer's ``mix`` to a `TritonOps` for its ``DeviceStepBatch`` steps; a
plain `StepBatch` still runs the layer's own reference code. `TritonOps` runs a whole
step per launch:

- attention: new K/V stored through the slot mapping (padding rows skipped), then decode
  attention when every sequence computes one token after cached context, else the
  ragged prefill kernel (which also serves decode rows mixed into a prefill step);
- Mamba2 decode: the conv1d update and the one-step state update over the step's slots;
- Mamba2 prefill (and mixed steps): one varlen causal conv launch over every sequence
  (prefill chunks and decodes, from and into their conv slots), then the Triton varlen
  scan over all sequences at once (39-71x the torch chunked scan on the H100,
  docs/BENCHMARKS.md).

dt is discretised inside the Mamba2 kernels exactly as the reference does it in torch
(softplus of ``dt + dt_bias`` in the activations' dtype, clamped to ``time_step_limit``,
each step rounded to that dtype), so both paths feed the same values to the scan and a
decode layer saves the four elementwise launches of doing it in torch.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from avmp.engine.device_batch import DeviceStepBatch

KERNEL_CHOICES = ("auto", "reference", "triton")


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (the ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(kernels: str, device: torch.device) -> bool:
    """Resolve a kernel choice for a device.

    ``auto`` picks Triton on CUDA when it is importable, the reference kernels
    elsewhere; ``triton`` insists (on the CPU only under Triton's interpreter,
    ``TRITON_INTERPRET=1``, which the tests use); ``reference`` never uses Triton.

    Raises:
        ValueError: an unknown choice, or ``triton`` where it cannot run.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    if kernels == "reference":
        return False
    if kernels == "auto":
        return device.type == "cuda" and triton_importable()
    if not triton_importable():
        raise ValueError("kernels='triton' needs the triton package (pip install avmp[gpu])")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernels='triton' runs on CUDA devices (got {device}); on the CPU only under "
            "Triton's interpreter (TRITON_INTERPRET=1)"
        )
    return True


class TritonOps:
    """The Triton path of the two cache-touching layers (see module doc)."""

    def __init__(self) -> None:
        from avmp.kernels import triton as kernels
        from avmp.kernels.triton.kv_write import kv_write

        self._k = kernels
        self._kv_write = kv_write
        self._decay: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def decay(self, mixer: Any) -> torch.Tensor:
        """``A = -exp(A_log)`` in fp32, computed once per weight version (three
        launches per layer and step saved; a reload of the weights recomputes it)."""
        a_log = mixer.A_log
        cached = self._decay.get(id(mixer))
        if cached is None or cached[0] != a_log._version or cached[1] is not a_log:
            cached = (a_log._version, a_log, -torch.exp(a_log.detach().float()))
            self._decay[id(mixer)] = cached
        return cached[2]

    def attend(
        self,
        layer: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: DeviceStepBatch,
        cache: Any,
    ) -> torch.Tensor:
        """``[T, heads, head_dim]`` attention output of the step's tokens."""
        k_cache, v_cache = cache.kv(layer.layer_index)
        self._kv_write(k_cache, v_cache, k, v, batch.slot_mapping)
        q = q.to(k_cache.dtype)
        if batch.is_decode:
            return self._k.decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, layer.scale
            )
        return self._k.prefill_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.query_start_loc,
            batch.context_lens,
            layer.scale,
            batch.max_query_len,
        )

    def mamba2_mix(
        self,
        mixer: Any,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        batch: DeviceStepBatch,
        cache: Any,
    ) -> torch.Tensor:
        """``[T, intermediate]`` output of the Mamba2 core (conv, then step or scan)."""
        conv_states, ssm_states = cache.state(mixer.layer_index)
        weight = mixer.conv1d.weight.squeeze(1)
        if batch.is_decode:
            xbc = self._k.conv1d_update(
                conv_states, batch.slot_idx, xbc, weight, mixer.conv1d.bias, "silu"
            )
        else:
            xbc = self._prefill_conv(mixer, xbc, weight, conv_states, batch)
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
        )
        if batch.is_decode:
            y = self._k.mamba2_state_update(
                ssm_states, batch.slot_idx, xs, dt, A, B, C, **dt_args
            )
        else:
            y = self._k.mamba2_varlen_scan(
                ssm_states,
                batch.slot_idx,
                batch.query_start_loc,
                xs,
                dt,
                A,
                B,
                C,
                has_initial_state=batch.has_initial_state,
                **dt_args,
            )
        return y.reshape(n, mixer.intermediate_size)

    def _prefill_conv(
        self,
        mixer: Any,
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
        )
