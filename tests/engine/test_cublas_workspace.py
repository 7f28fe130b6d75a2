"""Importing the engine asks cuBLAS for no workspace (no split-K), and leaves a process's
own choice alone. Checked in fresh interpreters: the variable is read from the environment
the import sees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from avmp.engine.cublas import NO_WORKSPACE, no_split_k

SHOW = "import avmp.engine, os; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"


def _imported_with(env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return proc.stdout.strip()


def test_importing_the_engine_turns_split_k_off() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    assert _imported_with(env) == NO_WORKSPACE


def test_a_workspace_the_process_chose_is_kept() -> None:
    env = os.environ | {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert _imported_with(env) == ":4096:8"


def test_no_split_k_says_whether_it_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert no_split_k() is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == NO_WORKSPACE
    assert no_split_k() is False
