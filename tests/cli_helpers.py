"""What the CLI tests share: the one line a failed command writes."""

from __future__ import annotations

import pytest


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The single stderr line of a failed command (asserted to be one line)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"avmp {command}: error: ") and "Traceback" not in captured.err
    return lines[0]
