from __future__ import annotations

import pytest

from avmp.models.geometry import ModelGeometry
from sched_helpers import tiny_geometry


@pytest.fixture
def geometry() -> ModelGeometry:
    return tiny_geometry()
