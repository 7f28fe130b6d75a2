"""cuBLAS without a workspace, so without split-K GEMMs.

At a decode step's few rows, cuBLAS's heuristics split the reduction of the narrower
projections (Granite-4.0-H-Micro's out_proj and down_proj at batch 1 and 64) over several
thread blocks and add the parts in a second kernel; that costs a launch per GEMM and more
than it saves. Without a workspace cuBLAS cannot split, and an engine decode step on an H100
is 2-4% faster on both benchmark geometries, prefill unchanged (docs/BENCHMARKS.md,
"Decode without cuBLAS's split-K"). The workspace is read once, when the process first
creates a cuBLAS handle, so this takes effect only if it runs before the process's first
GEMM on the GPU (importing `avmp.engine` does it).

A process that set ``CUBLAS_WORKSPACE_CONFIG`` keeps its value, for instance
``:4096:8``, which ``torch.use_deterministic_algorithms(True)`` requires (torch refuses
cuBLAS GEMMs under deterministic algorithms with any other workspace).
"""

from __future__ import annotations

import os

NO_WORKSPACE = ":0:0"
"""``CUBLAS_WORKSPACE_CONFIG`` for no workspace (``:size KiB:count`` pairs)."""


def no_split_k() -> bool:
    """Ask cuBLAS for no workspace unless the process chose one; whether it was asked."""
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = NO_WORKSPACE
    return True
