"""Fixtures of the engine tests; the helpers live in ``engine_helpers``."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import CONFIGS, TinyCheckpoint


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Iterator[Callable[..., TinyCheckpoint]]:
    """``tiny_checkpoint(family, **config_overrides)``, built once per session.

    Checkpoints live in a private temporary directory, not pytest's numbered ones:
    concurrent pytest sessions prune each other's old numbered directories, which
    would delete a checkpoint that later tests still load.
    """
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], TinyCheckpoint] = {}
    with tempfile.TemporaryDirectory(prefix="avmp-engine-tests-") as root:

        def build(family: str, **overrides: Any) -> TinyCheckpoint:
            key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
            if key not in built:
                path = Path(root) / f"{family}-{len(built)}"
                path.mkdir()
                built[key] = TinyCheckpoint(CONFIGS[family](**overrides), path)
            return built[key]

        yield build
