"""Where the Triton tests run: a CUDA device, or the CPU under Triton's interpreter
(``AVMP_TRITON_INTERPRET=1``); without either the calling module skips. Shared by the
kernel tests and the engine's GPU tests (``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import os
import sys

import pytest
import torch


def kernel_device() -> torch.device:
    """The device the kernels run on; skips the calling module when there is none.

    Must run before triton is first imported: Triton reads TRITON_INTERPRET when it
    decorates a kernel, its own standard library included.
    """
    interpret = os.environ.get("AVMP_TRITON_INTERPRET") == "1"
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            pytest.skip("triton was imported before interpreter mode was set: run with "
                        "TRITON_INTERPRET=1 as well", allow_module_level=True)
        # Before triton's first import: it reads the flag as it decorates its own library.
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if interpret:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (or AVMP_TRITON_INTERPRET=1)", allow_module_level=True)
    return torch.device("cuda")
