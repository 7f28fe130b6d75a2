"""Fixtures of the engine tests; the helpers live in ``engine_helpers``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from engine_helpers import CONFIGS, TinyCheckpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyCheckpoint]:
    """``tiny_checkpoint(family, **config_overrides)``, built once per session."""
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], TinyCheckpoint] = {}

    def build(family: str, **overrides: Any) -> TinyCheckpoint:
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(family)
            built[key] = TinyCheckpoint(CONFIGS[family](**overrides), path)
        return built[key]

    return build
