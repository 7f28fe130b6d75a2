"""Where the bytes of the two pools live. Only the host backing is imported here, so
importing this package never pulls in torch; GPU backings are imported by their module."""

from __future__ import annotations

from avmp.memory.backing.base import Backing, BackingError
from avmp.memory.backing.host import HostBacking

__all__ = ["Backing", "BackingError", "HostBacking"]
