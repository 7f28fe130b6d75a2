"""Ask the L2 cache for the next linear's weights from inside a small kernel.

Between a decode step's cuBLAS GEMMs run a norm or an activation kernel of a few
microseconds that moves kilobytes: memory sits idle while the next GEMM waits for its
launch, then starts streaming its weights from nothing. A norm or activation kernel
given the next linear's weight issues bulk L2 prefetches (Hopper's
``cp.async.bulk.prefetch.L2``) for its first bytes at its start; the requests are served
while the kernel works and the GEMM launches, and the GEMM finds them in L2. The
prefetch is a hint: it moves no data the kernel reads and changes no result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes of the next weight asked for: about what the memory moves in the few
# microseconds of a small kernel and a launch (a fraction of the H100's 50 MB L2).
PREFETCH_BYTES = 16 << 20
# Threads of a program that each issue one bulk prefetch.
THREADS = 128


@triton.jit
def prefetch_l2(base_ptr, nbytes, program, num_programs, THREADS: tl.constexpr):
    """This program's share of bytes ``[0, nbytes)`` from ``base_ptr``, one bulk
    prefetch a thread; ``nbytes`` and the base 16-byte aligned (each share is)."""
    base = base_ptr.to(tl.pointer_type(tl.uint8))
    share = tl.cdiv(tl.cdiv(nbytes, num_programs), 16) * 16
    chunk = tl.cdiv(tl.cdiv(share, THREADS), 16) * 16
    start = program * share + tl.arange(0, THREADS) * chunk
    stop = tl.minimum(tl.minimum(start + chunk, (program + 1) * share), nbytes)
    size = stop - start
    empty = size <= 0  # past the end: ask for the first 16 bytes again, a no-op
    start = tl.where(empty, 0, start)
    size = tl.where(empty, 16, size)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r",
        [base + start, size.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch_args(
    weight: torch.Tensor | None, limit: int = PREFETCH_BYTES
) -> tuple[torch.Tensor | None, int]:
    """``(tensor, bytes)`` to prefetch of ``weight``: its first ``limit`` bytes, whole
    16-byte units, or nothing (``(None, 0)``) when there is no weight or it is not on a
    GPU that has bulk prefetches (compute capability 9.0 or later)."""
    if weight is None or limit <= 0 or weight.device.type != "cuda":
        return None, 0
    if torch.cuda.get_device_capability(weight.device)[0] < 9 or weight.data_ptr() % 16:
        return None, 0
    nbytes = min(weight.numel() * weight.element_size(), limit) // 16 * 16
    return (weight, nbytes) if nbytes else (None, 0)


def num_threads(num_warps: int) -> int:
    """Prefetching threads a program of ``num_warps`` warps uses (one prefetch each)."""
    return min(THREADS, triton.next_power_of_2(32 * num_warps))
