"""Triton kernels (GPU) that read and write the AVMP pools through strided views.

Decode and prefill attention over page-major KV; the Mamba2 one-step state update, the
Mamba2 prefill scans (sequential in time, and chunked in the SSD form), Mamba1's decode
update and prefill scan, the causal conv1d update (decode) and the varlen causal conv1d
(prefill and mixed steps) over slot-major state. Each takes arbitrary strides and finds
its pages or slots through index tensors on the device, so a step never synchronises
with the host. Using a kernel needs ``triton`` (the ``gpu`` extra); the package itself
imports without it.
"""

from __future__ import annotations

import importlib.util

# Without Triton (CPU-only installs, CI) the kernels are absent but the package still
# imports, so `avmp.kernels.triton.compact` can fall back to torch.
if importlib.util.find_spec("triton") is not None:
    from avmp.kernels.triton.causal_conv1d_varlen import causal_conv1d_varlen
    from avmp.kernels.triton.conv1d_update import conv1d_update
    from avmp.kernels.triton.decode_attention import decode_attention
    from avmp.kernels.triton.mamba1 import mamba1_state_update, mamba1_varlen_scan
    from avmp.kernels.triton.mamba2_chunk_scan import mamba2_chunk_scan
    from avmp.kernels.triton.mamba2_state_update import mamba2_state_update
    from avmp.kernels.triton.mamba2_varlen_scan import mamba2_varlen_scan
    from avmp.kernels.triton.prefill_attention import prefill_attention

__all__ = [
    "causal_conv1d_varlen",
    "conv1d_update",
    "decode_attention",
    "mamba1_state_update",
    "mamba1_varlen_scan",
    "mamba2_chunk_scan",
    "mamba2_state_update",
    "mamba2_varlen_scan",
    "prefill_attention",
]
