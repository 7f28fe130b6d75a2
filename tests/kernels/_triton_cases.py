"""Shared helpers of the Triton kernel tests: where to run, strided pools, error metric.

The kernels run on a CUDA device, or on the CPU under Triton's interpreter when
``AVMP_TRITON_INTERPRET=1`` (slow; the tests keep their sizes tiny for that). Without
either, every test module skips, so CI (no GPU, no triton) skips them cleanly.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
POISON = float("nan")




def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN (an unwritten, poisoned element) never passes."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Fail when ``out`` is further than the dtype's tolerance from ``ref``."""
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def strided_views(
    shape: tuple[int, ...], num_views: int, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator, permute_inner: bool,
) -> list[torch.Tensor]:
    """``num_views`` tensors of ``shape`` interleaved unit-major in one pool, as the AVMP
    pools lay out a page (all layers' K and V) or a slot (all layers' states).

    The unit stride is therefore ``num_views`` times a view's unit size plus padding,
    and with ``permute_inner`` the dimensions inside a unit are stored reversed, so no
    view is contiguous. Filled with random values.
    """
    units, inner = shape[0], shape[1:]
    stored_inner = tuple(reversed(inner)) if permute_inner else inner
    pad = 3
    pool_numel = units * (num_views * _numel(inner) + pad)
    pool = torch.randn(pool_numel, generator=generator, dtype=torch.float32).to(dtype)
    pool = pool.to(device).view(units, -1)[:, : num_views * _numel(inner)]
    per_view = pool.view(units, num_views, *stored_inner)
    views = []
    for i in range(num_views):
        view = per_view[:, i]
        if permute_inner:
            view = view.permute(0, *range(len(inner), 0, -1))
        assert tuple(view.shape) == shape
        views.append(view)
    return views


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
