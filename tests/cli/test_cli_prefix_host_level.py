"""``--prefix-host-level`` on ``avmp replay``, ``avmp bench``, ``avmp generate`` and
``avmp serve``: the prefix cache keeps the checkpoints it evicts in the host tier, in
every layout that has one (not the peers as shipped); without a prefix cache or without
a host tier it is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_prefix_workload
from avmp.cli import main

REPLAY = ["--model", "nemotron-h-8b", "--profile", "h200", "--memory", "2GiB"]
BENCH = ["bench", "--quick", "--models", "nemotron-h-8b", "--budgets", "2GiB", "--seeds", "1",
         "--workers", "1", "--no-progress", "--workloads", "multi_turn_prefix"]  # fmt: skip
NO_CACHE = "--prefix-host-level keeps the checkpoints the prefix cache evicts: it needs"
RECOMPUTE = "which --preemption recompute leaves out"
NO_TIER = "which --host-tier 0 leaves out"
BAD = [
    ([], NO_CACHE),
    (["--prefix-cache", "avmp", "--preemption", "recompute"], RECOMPUTE),
    (["--prefix-cache", "sglang", "--host-tier", "0"], NO_TIER),
]


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 requests of conversations replayed turn by turn: at 2 GiB on Nemotron-H-8B the
    device level evicts checkpoints that later turns resume from."""
    path = tmp_path_factory.mktemp("trace") / "multi_turn.jsonl"
    write_jsonl(make_prefix_workload("multi_turn_prefix", 0, num_requests=64), path)
    return path


def _host_part(line: str) -> dict[str, int]:
    """The counts of a summary line's host-level part."""
    part = line.split("; host level: ")[1]
    return {
        "kept": int(part.split(" checkpoints kept")[0]),
        "restored": int(part.split("), ")[1].split(" hits restored")[0]),
    }


def test_replay_keeps_evicted_checkpoints_on_the_host_where_a_tier_is(
    multi_turn: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["replay", str(multi_turn), *REPLAY, "--allocators", "avmp,unified-shipped"]
    assert main([*base, "--prefix-cache", "avmp", "--json"]) == 0
    without = {r["allocator"]: r for r in json.loads(capsys.readouterr().out)}
    assert main([*base, "--prefix-cache", "avmp", "--prefix-host-level", "--json"]) == 0
    with_host = {r["allocator"]: r for r in json.loads(capsys.readouterr().out)}
    host = with_host["avmp"]["prefix"]["host_level"]
    assert host["num_kept"] > 0 and host["num_restored"] > 0
    assert "host_level" not in without["avmp"]["prefix"]
    # vLLM as shipped recomputes, without a host tier: it runs as without the flag
    assert "host_level" not in with_host["unified-shipped"]["prefix"]
    assert with_host["unified-shipped"]["prefix"] == without["unified-shipped"]["prefix"]
    assert main([*base, "--prefix-cache", "avmp", "--prefix-host-level"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (avmp,) = [line for line in lines if line.startswith("avmp: prefix cache avmp")]
    assert _host_part(avmp) == {"kept": host["num_kept"], "restored": host["num_restored"]}
    (shipped,) = [line for line in lines if line.startswith("unified-shipped: prefix cache")]
    assert "host level" not in shipped


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_replay_bad_host_level_is_one_line(
    multi_turn: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["replay", str(multi_turn), *REPLAY, "--prefix-host-level", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_records_the_host_level_in_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 64)
    args = [*BENCH, "--out", str(tmp_path), "--prefix-cache", "avmp", "--prefix-host-level"]
    assert main(args) == 0
    capsys.readouterr()
    cells = {path.name: json.loads(path.read_text()) for path in (tmp_path / "cells").iterdir()}
    avmp = cells["multi_turn_prefix__nemotron-h-8b__2p0GiB__h200__s0__avmp__prefix-avmp.json"]
    assert avmp["settings"]["prefix_host_level"] is True
    assert avmp["result"]["prefix"]["host_level"]["num_restored"] > 0
    shipped = next(c for name, c in cells.items() if "__unified-shipped__" in name)
    assert shipped["settings"]["prefix_host_level"] is True  # the run's, not the layout's
    assert "host_level" not in shipped["result"]["prefix"]
    # the same directory without the flag is other settings: refused, not mixed
    assert main([*BENCH, "--out", str(tmp_path), "--prefix-cache", "avmp"]) == 2
    assert "made with other prefix_host_level" in capsys.readouterr().err


def test_bench_without_the_flag_keeps_its_settings() -> None:
    from avmp.cli import build_parser
    from avmp.cli.bench import build_grid

    parser = build_parser()
    grid = build_grid(parser.parse_args([*BENCH, "--out", "x", "--prefix-cache", "avmp"]))
    assert not grid.prefix_host_level
    assert "prefix_host_level" not in grid.settings_for("multi_turn_prefix")


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bench_bad_host_level_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main([*BENCH, "--out", str(tmp_path), "--prefix-host-level", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cells").exists()  # before any work


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(("flags", "message"), BAD)
def test_engine_commands_bad_host_level_is_one_line(
    command: str, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny"]
    argv += ["--prompt", "1 2"] if command == "generate" else ["--port", "0"]
    assert main([*argv, "--prefix-host-level", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_with_the_host_level_prints_the_same_tokens_and_what_it_did(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "granite-4.0-h-tiny", "--random-weights", "--scale", "tiny",
            "--memory", "8MiB", "--max-tokens", "4", "--prompt", "5 6 7 8 9",
            "--prompt", "5 6 7 8 9 10", "--prefix-cache", "avmp"]  # fmt: skip
    assert main(argv) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main([*argv, "--prefix-host-level"]) == 0
    host = capsys.readouterr().out.splitlines()

    def tokens(lines: list[str]) -> list[str]:
        return [line for line in lines if line.lstrip().startswith("->")]

    assert tokens(host) == tokens(plain) and len(tokens(host)) == 2
    (line,) = [line for line in host if line.startswith("prefix cache avmp")]
    assert "; host level: " in line and "checkpoints copied out" in line
    assert not any("host level" in line for line in plain)
