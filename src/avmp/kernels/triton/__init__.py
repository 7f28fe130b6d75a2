"""Triton kernels (GPU) that read and write the AVMP pools through strided views.

Decode and prefill attention over page-major KV; the Mamba2 one-step state update, the
Mamba2 prefill scan and the causal conv1d update over slot-major state. Each takes
arbitrary strides and finds its pages or slots through index tensors on the device, so
a step never synchronises with the host. Using a kernel needs ``triton`` (the ``gpu``
extra); the package itself imports without it.
"""

from __future__ import annotations

import importlib
from typing import Any

# Kernel name -> its module. Loaded on first use, so that `avmp.kernels.triton.compact`
# (which falls back to torch) imports on machines without Triton.
_KERNELS = {
    "conv1d_update": "conv1d_update",
    "decode_attention": "decode_attention",
    "mamba2_state_update": "mamba2_state_update",
    "mamba2_varlen_scan": "mamba2_varlen_scan",
    "prefill_attention": "prefill_attention",
}

__all__ = sorted(_KERNELS)


def __getattr__(name: str) -> Any:
    module = _KERNELS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
