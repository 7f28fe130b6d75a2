"""`avmp bench --prefix-cache`: the axis runs beside the cache off, the prefix workloads
are selectable and on by default with a cache, and bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.cli import main

TINY = ["bench", "--quick", "--models", "granite-4.0-h-tiny", "--budgets", "8GiB",
        "--seeds", "1", "--workers", "1", "--no-progress"]


def test_bench_runs_the_cache_beside_off_and_prints_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 8)
    args = [*TINY, "--out", str(tmp_path), "--workloads", "agent_loop",
            "--prefix-cache", "off,sglang"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| agent_loop | sglang | static |" in printed and "| agent_loop | off | static |" \
        in printed
    assert "prefix caching:" in printed and "| agent_loop | sglang | avmp | 1 |" in printed
    assert "12 cells (12 simulated now" in printed  # 6 layouts x (off, sglang)
    saved = json.loads(next((tmp_path / "cells").glob("*__avmp__prefix-sglang.json"))
                       .read_text())
    assert saved["cell"]["prefix_cache"] == "sglang" and saved["result"]["prefix"]["num_hits"]


def test_default_workloads_add_the_prefix_ones_only_with_a_cache(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from avmp.cli import build_parser
    from avmp.cli.bench import build_grid

    parser = build_parser()
    off = build_grid(parser.parse_args([*TINY, "--out", "x"]))
    on = build_grid(parser.parse_args([*TINY, "--out", "x", "--prefix-cache", "avmp"]))
    assert "few_shot" not in off.workloads and off.prefix_caches == ("off",)
    assert set(on.workloads) == set(off.workloads) | {
        "multi_turn_prefix",
        "sharegpt_multi_turn",
        "agent_loop",
        "few_shot",
        "shared_shift",
    }


@pytest.mark.parametrize(("args", "message"), [
    (["--prefix-cache", "avmp,lru"], "--prefix-cache: unknown 'lru'; known: off, avmp"),
    (["--prefix-cache", "avmp", "--models", "nemotron-h-8b", "--budgets", "90MiB"],
     "prefix caching needs room for a checkpoint"),
    (["--workloads", "few_shot", "--arrival", "poisson:4"], "--arrival cannot re-time few_shot"),
])
def test_bad_prefix_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([*TINY, "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
