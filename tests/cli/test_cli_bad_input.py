"""Bad input across plan, bench, replay and report, as an adversarial user tries it:
each is one line on stderr and a non-zero exit (or handled), never a traceback, a hang
or a silently wrong row."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import MAX_BUDGET_BYTES, main
from cli_helpers import one_line_error

REPLAY = ["--model", "jamba-1.5-mini", "--memory", "1GiB", "--profile", "h200"]  # fits on 141 GB
BENCH = ["--quick", "--models", "jamba-1.5-mini", "--budgets", "1GiB", "--seeds", "1",
         "--workloads", "shift", "--workers", "1", "--no-progress"]
OK = '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n'


# ---------------------------------------------------------------- traces


@pytest.mark.parametrize(("text", "message"), [
    (OK + '{"arrival_s": NaN, "prompt_tokens": 3, "output_tokens": 2}\n',
     "trace.jsonl:2: arrival_s must be finite"),  # looped forever
    (OK + '{"arrival_s": Infinity, "prompt_tokens": 3, "output_tokens": 2}\n',
     "trace.jsonl:2: arrival_s must be finite"),  # printed a nonsense row, exit 0
    ('{"arrival_s": 0, "prompt_tokens": Infinity, "output_tokens": 2}\n',
     "trace.jsonl:1: prompt_tokens must be a whole number"),  # OverflowError
    ('{"arrival_s": 0, "prompt_tokens": true, "output_tokens": 2}\n',
     "trace.jsonl:1: prompt_tokens must be a whole number >= 0, got True"),  # read as 1
    ("[3, 2]\n", "trace.jsonl:1: expected a JSON object"),
])
def test_replay_of_a_bad_trace_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           text: str, message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    started = time.monotonic()
    assert main(["replay", str(path), *REPLAY]) == 2
    assert time.monotonic() - started < 30
    assert message in one_line_error(capsys, "replay")


def test_replay_of_binary_junk_names_the_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["replay", str(path), *REPLAY]) == 2
    assert f"{path}: not a UTF-8 text file" in one_line_error(capsys, "replay")


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "100TiB"], "is more than the 1.00 TiB"),
    (["--memory", "1" + "0" * 400], "too large to be a size"),
    (["--memory", "12MB"], "no request fits in 11.4 MiB with any allocator"),
])
def test_replay_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                        message: str) -> None:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=6), path)
    started = time.monotonic()
    assert main(["replay", str(path), "--model", "jamba-1.5-mini", "--profile", "h200", *args]) == 2
    assert time.monotonic() - started < 30
    assert message in one_line_error(capsys, "replay")


def test_a_trace_that_is_a_pipe_is_refused_as_such(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``avmp replay <(zcat trace.jsonl.gz)``: a trace is read more than once, so a pipe
    is refused, but not as "no such trace file" (it exists)."""
    pipe = tmp_path / "trace.jsonl"
    os.mkfifo(pipe)
    assert main(["replay", str(pipe), *REPLAY]) == 2
    assert f"{pipe}: not a regular file" in one_line_error(capsys, "replay")
    assert main(["bench", "--out", str(tmp_path / "out"), *BENCH, "--trace", str(pipe)]) == 2
    assert f"--trace {pipe}: not a regular file" in one_line_error(capsys, "bench")


def test_replay_with_a_directory_for_calibration(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(OK)
    assert main(["replay", str(path), *REPLAY, "--calibration", str(tmp_path)]) == 2
    assert f"{tmp_path}: Is a directory" in one_line_error(capsys, "replay")


# ---------------------------------------------------------------- plan


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "100TiB"], "is more than the 1.00 TiB"),
    (["--memory", "1TiB"], "more than the 20,000 that plan counts"),
    (["--memory", "256GiB", "--prompt", "1", "--output", "0"], "that plan counts"),
    (["--memory", "-1GiB"], "argument --memory: expected one argument"),
    (["--memory", "12GiB", "--prompt", "1e3"], "whole number of tokens"),
])
def test_plan_answers_in_seconds_or_says_why_not(capsys: pytest.CaptureFixture[str],
                                                 args: list[str], message: str) -> None:
    started = time.monotonic()
    assert main(["plan", "jamba-1.5-mini", *args]) == 2
    assert time.monotonic() - started < 20
    assert message in one_line_error(capsys, "plan")


def test_plan_at_the_budget_limit_of_long_requests_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    memory = f"{MAX_BUDGET_BYTES >> 30}GiB"
    assert main(["plan", "jamba-1.5-mini", "--memory", memory, "--prompt", "500000",
                 "--output", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_bytes"] == MAX_BUDGET_BYTES


class _ClosedPipe(io.StringIO):
    """stdout of ``avmp plan ... | head -1`` once head has exited."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_plan_into_a_closed_pipe_exits_quietly(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["plan", "jamba-1.5-mini", "--memory", "12GiB"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("config", "message"), [
    ({"num_attention_heads": 12, "num_key_value_heads": 5, "hidden_size": 3072},
     "num_attention_heads 12 is not a multiple of num_key_value_heads 5"),
    ({"hidden_size": None, "num_attention_heads": 12}, "missing key 'hidden_size'"),
    ({"model_type": ["jamba"]}, "unsupported model_type ['jamba']"),  # TypeError: unhashable
])
def test_plan_of_a_bad_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             config: dict[str, object], message: str) -> None:
    from avmp.models import zoo_config

    raw = {**zoo_config("jamba-1.5-mini"), **config}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    assert main(["plan", str(path), "--memory", "12GiB"]) == 2
    assert f"{path}: {message}" in one_line_error(capsys, "plan")


def test_plan_of_a_config_with_bad_layer_indices_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a TypeError traceback (unhashable type: 'list')."""
    from avmp.models import zoo_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**zoo_config("bamba-9b"), "attn_layer_indices": [[9], 18]}))
    assert main(["plan", str(path), "--memory", "12GiB"]) == 2
    assert (f"{path}: 'attn_layer_indices' must be a list of layer indices, got [9] in it"
            in one_line_error(capsys, "plan"))


@pytest.mark.parametrize("model", ["bamba-9b", "jamba-1.5-mini"])
def test_plan_of_a_config_with_a_mistyped_layer_count_answers_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    """A billion layers kept plan building layer lists for minutes."""
    from avmp.models import zoo_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**zoo_config(model), "num_hidden_layers": 1_000_000_000}))
    started = time.monotonic()
    assert main(["plan", str(path), "--memory", "12GiB"]) == 2
    assert time.monotonic() - started < 10
    assert (f"{path}: num_hidden_layers 1000000000 is more than 10,000 layers"
            in one_line_error(capsys, "plan"))


# ---------------------------------------------------------------- bench


@pytest.mark.parametrize(("step_s", "message"), [
    (1e308, "step_s 1e+308 is more than 3600 s"),  # was a whole sweep, then an arange error
    (10**400, "bad or missing field (int too large to convert to float)"),  # was a traceback
    (None, "Is a directory"),
])
def test_bench_refuses_a_bad_calibration_before_any_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], step_s: float | None, message: str
) -> None:
    path = tmp_path / "calibration.json"
    if step_s is None:
        path.mkdir()
    else:
        points = [{"num_prefill_tokens": 64 * i, "num_decode_requests": i,
                   "num_context_tokens": 512 * i, "step_s": step_s} for i in range(1, 9)]
        path.write_text(json.dumps({"gpu": "H100", "points": points}))
    assert main(["bench", "--out", str(tmp_path / "out"), *BENCH,
                 "--calibration", str(path)]) == 2  # fmt: skip
    assert message in one_line_error(capsys, "bench")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--budgets", "100TiB"], "is more than the 1.00 TiB"),
    (["--seeds", "1000000000"], "--seeds must be between 1 and 1000"),
    (["--workers", "100000"], "--workers must be between 1 and"),
    (["--arrival", "gamma:1:inf"], "arrival cv"),
])
def test_bench_refuses_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       args: list[str], message: str) -> None:
    started = time.monotonic()
    assert main(["bench", "--out", str(tmp_path / "out"), *BENCH, *args]) == 2
    assert time.monotonic() - started < 30
    assert message in one_line_error(capsys, "bench")
    assert not (tmp_path / "out").exists()


def test_bench_out_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results"
    target.write_text("a file")
    assert main(["bench", "--out", str(target), *BENCH]) == 2
    assert f"{target}: not a directory" in one_line_error(capsys, "bench")
    assert main(["bench", "--out", str(target / "below"), *BENCH]) == 2
    assert f"{target / 'below' / 'cells'}: Not a directory" in one_line_error(capsys, "bench")


def test_bench_out_empty_is_not_the_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out "$DIR"`` with DIR unset wrote cells/ and report.md into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--out", "", *BENCH]) == 2
    assert "--out is empty" in one_line_error(capsys, "bench")
    assert not any(tmp_path.iterdir())


def test_bench_on_a_ray_address_where_nothing_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ray.init retried such an address for minutes (a hang, Ray's log lines every 5 s)."""
    ray = pytest.importorskip("ray")

    def hang(*args: object, **kwargs: object) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", hang)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    assert main(["bench", "--out", str(tmp_path), *BENCH, "--ray", address]) == 2
    assert (f"--ray {address}: no Ray head node answers there (Connection refused)"
            in one_line_error(capsys, "bench"))


def test_bench_out_read_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a read-only folder (the tests may run as root, who may write anywhere)."""
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["bench", "--out", str(tmp_path / "out"), *BENCH]) == 2
    assert f"{tmp_path / 'out' / 'cells'}: Permission denied" in one_line_error(capsys, "bench")


def test_bench_on_a_full_disk_names_the_file_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 8)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("avmp.bench.files.os.fsync", full)
        assert main(["bench", "--out", str(tmp_path), *BENCH]) == 2
    line = one_line_error(capsys, "bench")
    assert f"{tmp_path / 'cells'}" in line and line.endswith(".json: No space left on device")
    assert main(["bench", "--out", str(tmp_path), *BENCH]) == 0
    assert "6 cells (6 simulated now" in capsys.readouterr().out


def test_bench_resumes_over_corrupt_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("avmp.cli.bench.QUICK_REQUESTS", 8)
    assert main(["bench", "--out", str(tmp_path), *BENCH]) == 0
    cells = sorted((tmp_path / "cells").glob("*.json"))
    cells[0].write_text("{}")
    cells[1].write_text('{"cell": {"workload": ')
    capsys.readouterr()
    assert main(["bench", "--out", str(tmp_path), *BENCH]) == 0
    captured = capsys.readouterr()
    assert "6 cells (2 simulated now" in captured.out
    assert captured.err.count("not valid cells") == 1


# ---------------------------------------------------------------- report


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny sweep directory (copied by each test that changes it)."""
    directory = tmp_path_factory.mktemp("quick")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("avmp.cli.bench.QUICK_REQUESTS", 8)
        assert main(["bench", "--out", str(directory), *BENCH]) == 0
    return directory


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "malformed JSON"),
    ('{"cell": [], "settings": {}, "result": {}}', "no 'cell' object"),
    ("[]", "not a JSON object"),
])
def test_report_names_a_corrupt_cell(quick_results: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], text: str,
                                     problem: str) -> None:
    shutil.copytree(quick_results, tmp_path, dirs_exist_ok=True)
    bad = sorted((tmp_path / "cells").glob("*.json"))[0]
    bad.write_text(text)
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    line = one_line_error(capsys, "report")
    assert f"{bad}: not a sweep cell" in line and problem in line


def test_report_of_a_file_or_an_empty_folder(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["report", str(tmp_path / "file")]) == 2
    assert "neither a sweep directory nor a bench serve result" in one_line_error(capsys, "report")
    assert main(["report", str(tmp_path)]) == 2  # a folder without cells/
    assert "no sweep results" in one_line_error(capsys, "report")
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no finished cells" in one_line_error(capsys, "report")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 2
    assert "the following arguments are required: MODEL" in one_line_error(capsys, "plan")
    assert main(["bench", "--sharegpt-rules", "mine"]) == 2
    assert "invalid choice" in one_line_error(capsys, "bench")
