"""Every test runs with an isolated avmp cache dir (ShareGPT length caches), never ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """ShareGPT length caches go to a per-session temp dir, never to ~/.cache."""
    monkeypatch.setenv("AVMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "avmp-cache"))
