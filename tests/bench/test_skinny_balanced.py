"""benchmarks.skinny_balanced off a GPU: one line and exit status 2, no traceback."""

from __future__ import annotations

import pytest
import torch

from benchmarks.skinny_balanced import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message off a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "granite-4.0-h-micro"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["skinny_balanced: needs a CUDA GPU"]
