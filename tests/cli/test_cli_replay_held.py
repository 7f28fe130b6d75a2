"""``avmp replay`` says when a turn naming an earlier answer came before that answer
ended and was sent at its end (the simulator holds it, with the cache on or off)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.cli import main
from avmp.sched.request import RequestSpec


def _trace(path: Path, second_arrival_s: float) -> Path:
    first = RequestSpec(0, 0.0, 2000, 300, (("sys", 2000),), "answer-0")
    history = (("sys", 2000), ("answer-0", 300), ("user-1", 50))
    write_jsonl([first, RequestSpec(1, second_arrival_s, 2350, 20, history)], path)
    return path


@pytest.mark.parametrize("prefix_cache", ["off", "avmp"])
def test_replay_names_the_held_turns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prefix_cache: str
) -> None:
    args = ["--model", "nemotron-h-8b", "--profile", "h200", "--memory", "8GiB",
            "--allocators", "avmp,static", "--prefix-cache", prefix_cache]
    assert main(["replay", str(_trace(tmp_path / "early.jsonl", 0.01)), *args]) == 0
    held = [line for line in capsys.readouterr().out.splitlines() if "were sent at" in line]
    assert [line.split(":")[0] for line in held] == ["avmp", "static"]
    assert all("1 requests naming an earlier output" in line for line in held)
    assert main(["replay", str(_trace(tmp_path / "late.jsonl", 600.0)), *args]) == 0
    assert "were sent at" not in capsys.readouterr().out
