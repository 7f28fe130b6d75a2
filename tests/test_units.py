import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmp.units import ceil_div, format_bytes, parse_bytes, round_up


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 << 30),
        ("512MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("2mib", 2 << 20),
        (" 8G ", 8 << 30),
        (64, 64),
    ],
)
def test_parse_bytes_accepts_common_spellings(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["12 GiB", "-1", "0", "GiB", "12XB", "", "0.1B", -5])
def test_parse_bytes_rejects_bad_sizes_with_a_message(text: str | int) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_format_bytes_picks_a_binary_unit() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(8.3 * (1 << 20)) == "8.3 MiB"
    assert format_bytes(12 << 30) == "12.0 GiB"
    assert format_bytes(3 << 40) == "3.00 TiB"


@given(st.integers(0, 10**12), st.integers(1, 10**6))
def test_ceil_div_and_round_up_match_exact_rational_rounding(value: int, divisor: int) -> None:
    quotient = ceil_div(value, divisor)
    assert (quotient - 1) * divisor < value <= quotient * divisor or value == quotient == 0
    assert round_up(value, divisor) == quotient * divisor
