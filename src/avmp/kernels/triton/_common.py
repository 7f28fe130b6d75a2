"""Small host-side helpers shared by the Triton kernels: shape checks and block sizes.

Every kernel in this package takes its tensors with arbitrary strides (the AVMP pools
hand out strided per-layer views), so these helpers check shapes and dtypes, never
contiguity.
"""

from __future__ import annotations

import torch
import triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): Triton block shapes must be powers of 2."""
    return max(int(triton.next_power_of_2(max(n, 1))), minimum)


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ValueError unless ``tensor``'s dtype is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError if the given tensors live on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def strides(tensor: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """The strides of ``tensor`` in elements, or zeros for an absent optional tensor."""
    return (0,) * ndim if tensor is None else tuple(tensor.stride())


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 inputs (tf32 would cost ~3e-4 relative error);
    half-precision inputs take the tensor cores' native path either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 first: Triton 3.6's CPU
    interpreter multiplies bf16 as raw integers, so only there bf16 dots go through fp32
    (on the GPU they stay bf16 on the tensor cores)."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)
