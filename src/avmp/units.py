"""Byte sizes as people write them ("12GiB", "512MiB", "1.5GB") and back."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([A-Za-z]*)$")


def parse_bytes(text: str | int) -> int:
    """Parse a byte size such as ``12GiB``, ``512MiB``, ``1.5GB`` or ``4096``.

    Raises:
        ValueError: the text is not a positive size with a known unit (the
            message says what was expected).
    """
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(
            f"bad size {text!r}: write a positive number and a unit with no space, "
            "e.g. 12GiB, 512MiB"
        )
    number, unit = match.groups()
    factor = _UNITS.get(unit.upper())
    if factor is None:
        raise ValueError(
            f"bad size {text!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
        )
    value = int(float(number) * factor)
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(num_bytes: float) -> str:
    """Format a byte count with a binary unit: ``8.3 MiB``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def ceil_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded up, in integers (no float rounding)."""
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return ceil_div(value, multiple) * multiple
