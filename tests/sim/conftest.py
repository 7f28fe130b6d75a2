from __future__ import annotations

import pytest
from sim_helpers import tiny_geometry

from avmp.models.geometry import ModelGeometry


@pytest.fixture
def geometry() -> ModelGeometry:
    return tiny_geometry()
