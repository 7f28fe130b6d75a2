"""Writing result files: whole or absent, readable as any file the user creates, and
failing with an error that names the file.

`tempfile.mkstemp` would create files readable by their owner only (mode 0600), so a
sweep's results could not be shared from a group folder; these files take the umask's
permissions instead, as `open` gives (0644 under umask 022).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Attach ``path`` to an `OSError` raised inside that names no file (a write that
    fails for lack of space names none), so the error says which file failed."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def write_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as compact JSON so that ``path`` is either absent or complete, never
    half written: a temporary file beside it (``.<stem>.<random>.tmp``), synced, then
    renamed over it.

    Raises:
        OSError: naming ``path`` (permission denied, no space left, not a directory).
    """
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp")
    try:
        # Mode 0o666 less the umask, as open() would create it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, sort_keys=True, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            error.filename, error.filename2 = str(path), None
        raise
