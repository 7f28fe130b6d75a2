"""The Triton benchmarks redraw their committed results without Triton or torch:
`--markdown FILE` (and `--help`) of `kernels`, `scan_tune`, `attn_tune` and `skinny_gemm`,
as docs/BENCHMARKS.md gives them, each in a subprocess in which importing triton or torch
fails, whether or not they are installed here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.common import REPO_ROOT

# As where neither is installed: with None in sys.modules, `import triton` raises
# ModuleNotFoundError and `importlib.util.find_spec("triton")` returns None (torch alike).
NO_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['torch'] = None"
# `python -m MODULE ARGS` after NO_TRITON
RUN_MODULE = (NO_TRITON + "; import runpy; sys.argv = sys.argv[1:]; "
              "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
RESULTS = "benchmarks/results/"
# (module and arguments, a line of the table it prints)
MARKDOWN = [
    pytest.param(["benchmarks.kernels", "--markdown", RESULTS + "kernels_h100.json.gz"],
                 "| kernel | shape | Triton ms (runs) | GB/s |", id="kernels"),
    pytest.param(["benchmarks.scan_tune", "--markdown",
                  RESULTS + "scan_tune_granite_h200_s11.json.gz"],
                 "| model geometry | kernel | default tiles | tuned tiles |", id="scan_tune"),
    pytest.param(["benchmarks.scan_tune", "--markdown",
                  RESULTS + "scan_tune_granite_h200_s11.json.gz", "--trials", "chunk_scan"],
                 "| model geometry | chunk_scan tiles |", id="scan_tune --trials"),
    pytest.param(["benchmarks.attn_tune", "--markdown", RESULTS + "attn_tune_h200.json.gz"],
                 "| model geometry | step | default tiles | ms | TFLOP/s |", id="attn_tune"),
    pytest.param(["benchmarks.skinny_gemm", "--markdown", RESULTS + "skinny_gemm_h100.json.gz"],
                 "| N x K | M | cuBLAS µs |", id="skinny_gemm"),
]


def run_without_triton(*argv: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"),
                                                       os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", RUN_MODULE, *argv], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_triton_is_unimportable_in_the_subprocess() -> None:
    check = "; import importlib.util; assert importlib.util.find_spec('triton') is None"
    proc = subprocess.run([sys.executable, "-c", NO_TRITON + check + "; import triton"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("argv", "table_line"), MARKDOWN)
def test_markdown_of_a_committed_result_needs_no_triton(argv: list[str], table_line: str
                                                        ) -> None:
    proc = run_without_triton(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table_line in proc.stdout


@pytest.mark.parametrize("module", ["kernels", "scan_tune", "attn_tune", "skinny_gemm"])
def test_help_needs_no_triton(module: str) -> None:
    proc = run_without_triton(f"benchmarks.{module}", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: ") and "--markdown" in proc.stdout
