"""Which kernels run on a device: the torch reference kernels (`avmp.kernels.reference`)
or the Triton ones (`avmp.kernels.triton`), resolved once, when the engine is built."""

from __future__ import annotations

import importlib.util
import os

import torch

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
