"""CSV traces read row by row as lists (`avmp.bench.traces._csv_rows`): cells by their
column, as a dict of the row would hold them, and Azure times as UTC timestamps."""

from __future__ import annotations

from pathlib import Path

import pytest

from avmp.bench.traces import TraceError, read_trace


def test_csv_cells_are_read_by_column_as_a_dict_of_the_row_would(tmp_path: Path) -> None:
    # blank lines skipped, cells with spaces, extra cells, a repeated column: its last
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP, ContextTokens ,GeneratedTokens,ContextTokens\n\n"
                    "2023-11-16 18:15:46.6805900,1,10,4808\n\n"
                    "2023-11-16 18:15:50.9951690+00:00,2,8 , 3180 ,extra\n")  # fmt: skip
    first, second = read_trace(path)
    assert (first.prompt_tokens, first.output_tokens) == (4808, 10)
    assert (second.prompt_tokens, second.output_tokens) == (3180, 8)
    assert second.arrival_s == pytest.approx(4.314579, abs=1e-6)
    blank = tmp_path / "blank.csv"
    blank.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday, ,3\n")
    with pytest.raises(TraceError, match=r"blank.csv:2: no value in column ContextTokens$"):
        read_trace(blank)


@pytest.mark.parametrize(
    "stamp",
    ["2023-11-16 18:15:46.6805900", "2024-05-10 00:00:00", "1969-12-31 23:59:59.999999",
     "2023-03-26 02:30:00.1234567", "2023-11-16T18:15:46.68+02:00"],
)  # fmt: skip
def test_azure_times_are_the_utc_timestamps(stamp: str) -> None:
    from datetime import UTC, datetime

    from avmp.bench.traces import _parse_datetime

    moment = datetime.fromisoformat(stamp[:26] if "+" not in stamp else stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    assert _parse_datetime(f" {stamp} ") == moment.timestamp()
