"""benchmarks/prefix_traces.py on a small Mooncake-format trace: every policy on the same
requests, arrivals stretched, the table drawn from the saved result; bad input is one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import prefix_traces
from benchmarks.common import read_result


def _trace(path: Path) -> Path:
    """Twelve rows: three conversations whose turns repeat the earlier turns' blocks."""
    lines = []
    for turn in range(4):
        for session in range(3):
            ids = [1000 * session + block for block in range(2 * turn + 2)]
            lines.append(json.dumps({"timestamp": 1000 * (3 * turn + session),
                                     "input_length": 512 * len(ids) - 100,
                                     "output_length": 20, "hash_ids": ids}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_policy_on_a_stretched_trace(tmp_path: Path) -> None:
    out = tmp_path / "traces.json.gz"
    trace = _trace(tmp_path / "mooncake_trace.jsonl")
    argv = [str(trace), "--model", "granite-4.0-h-tiny", "--memory", "8GiB", "--rows", "10",
            "--stretch", "3", "--out", str(out)]  # fmt: skip
    assert prefix_traces.main(argv) == 0
    saved = read_result(out)
    (cell,) = saved["cells"]
    assert cell["num_requests"] == 10 and saved["settings"]["stretch"] == 3
    assert not cell["off"]["prefix"]
    assert cell["avmp"]["prefix"]["num_hit_tokens"] > 0  # later turns resume
    text = prefix_traces.table(saved)
    assert "arrivals x3" in text and "| mooncake_trace.jsonl | sglang |" in text


@pytest.mark.parametrize("argv, message", [
    (["missing.jsonl"], "no such trace file: missing.jsonl"),
    ([], "give at least one trace file"),
    (["--rows", "0", "x"], "--rows must be >= 1"),
])  # fmt: skip
def test_bad_arguments_are_one_line(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        prefix_traces.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
