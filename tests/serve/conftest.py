"""Fixtures of the server tests; the helpers live in ``serve_helpers``."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import write_checkpoint


@pytest.fixture(scope="session")
def checkpoints() -> Iterator[dict[str, Path]]:
    """Two tiny checkpoints, one with a chat template and one without, written once.

    They live in a private temporary directory: concurrent pytest sessions prune each
    other's numbered directories (see tests/engine/conftest.py).
    """
    with tempfile.TemporaryDirectory(prefix="avmp-serve-tests-") as root:
        yield {
            "chat": write_checkpoint(Path(root) / "chat"),
            "plain": write_checkpoint(Path(root) / "plain", chat_template=False),
        }
