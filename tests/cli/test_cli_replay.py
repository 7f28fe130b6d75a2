from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmp.bench.sweep import LAYOUTS
from avmp.bench.traces import write_jsonl
from avmp.bench.workloads import make_workload
from avmp.cli import main


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_jsonl(make_workload("shift", 0, num_requests=12), path)
    return path


def test_replay_prints_one_row_per_allocator(trace: Path, capsys) -> None:
    assert main(["replay", str(trace), "--model", "granite-4.0-h-micro", "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "12 requests" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "allocator" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(LAYOUTS)
    assert "| avmp | 12 | 0 |" in out and "1.00x" in out


def test_the_progress_bar_shows_on_a_terminal_only(
    trace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One bar per allocator, requests finished of the trace's, on a terminal's stderr;
    nothing on a pipe or with --no-progress, and the table the same either way."""
    from avmp.cli import replay as replay_cli

    argv = ["replay", str(trace), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--allocators", "avmp,static"]  # fmt: skip
    assert main(argv) == 0
    piped = capsys.readouterr()
    assert piped.err == ""
    seen: list[tuple[str, float, float]] = []
    real = replay_cli.replay_progress

    def watched(disabled: bool):
        bar = real(disabled)
        update = bar.update

        def record(task, **fields):
            seen.append((bar.tasks[task].description, fields["completed"], fields["total"]))
            update(task, **fields)

        bar.update = record
        return bar

    monkeypatch.setattr(replay_cli, "replay_progress", watched)
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().out == piped.out
    assert {d for d, _, _ in seen} == {"avmp", "static"}
    assert all(total == 12 for _, _, total in seen)
    assert [c for d, c, _ in seen if d == "avmp"][-1] == 12  # ends full


def test_replay_json_is_the_raw_results(trace: Path, capsys) -> None:
    argv = [
        "replay",
        str(trace),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "1GiB",
        "--json",
        "--allocators",
        "avmp,static",
        "--profile",
        "rtx3060",
    ]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["allocator"] for r in results] == ["avmp", "static"]
    assert all(r["num_completed"] == 12 for r in results)


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        (
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n{"arrival_s": 1}\n',
            [],
            "trace.jsonl:2: missing field",
        ),
        ("", [], "empty trace"),
        (
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n',
            ["--memory", "lots"],
            "bad size",
        ),
        (
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n',
            ["--model", "nope"],
            "unknown model",
        ),
        (
            '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n',
            ["--allocators", "lru"],
            "unknown allocator",
        ),
    ],
)
def test_replay_user_mistakes(
    tmp_path: Path, capsys, text: str, args: list[str], message: str
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    argv = ["replay", str(path), "--model", "granite-4.0-h-micro", "--memory", "1GiB", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replay_missing_trace(tmp_path: Path, capsys) -> None:
    argv = [
        "replay",
        str(tmp_path / "no.jsonl"),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "1GiB",
    ]
    assert main(argv) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_replay_with_a_calibration_file(trace: Path, tmp_path: Path, capsys) -> None:
    points = [
        {
            "num_prefill_tokens": p,
            "num_decode_requests": d,
            "num_context_tokens": c,
            "step_s": 0.01 + 1e-5 * p + 1e-4 * d + 1e-7 * c,
        }
        for p, d, c in ((0, 1, 100), (512, 0, 0), (0, 8, 4000), (256, 4, 2000), (64, 2, 50))
    ]
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"gpu": "h100", "points": points}))
    base = [
        "replay",
        str(trace),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "1GiB",
        "--json",
        "--allocators",
        "avmp",
    ]
    assert main(base) == 0
    roofline = json.loads(capsys.readouterr().out)[0]
    assert main([*base, "--calibration", str(calibration)]) == 0
    calibrated = json.loads(capsys.readouterr().out)[0]
    assert calibrated["time_model"] != roofline["time_model"]
    assert calibrated["makespan_s"] != roofline["makespan_s"]
    assert main([*base, "--calibration", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_replay_charges_graph_captures_only_when_asked(trace: Path, capsys) -> None:
    """A calibration with capture costs: a warmed-up server by default, an engine that
    captures mid-run with --charge-captures (slower by what it charged)."""
    results = Path(__file__).parents[2] / "benchmarks" / "results"
    calibration = results / "calibration_h200_s11_granite-4.0-h-micro.json.gz"
    base = ["replay", str(trace), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--profile", "h200", "--json", "--allocators", "avmp",
            "--calibration", str(calibration)]  # fmt: skip
    assert main(base) == 0
    steady = json.loads(capsys.readouterr().out)[0]
    assert main([*base, "--charge-captures"]) == 0
    charged = json.loads(capsys.readouterr().out)[0]
    assert "num_graph_captures" not in steady and charged["num_graph_captures"] > 0
    assert charged["makespan_s"] > steady["makespan_s"]
    assert main(base[:-2] + ["--charge-captures"]) == 2
    assert "--charge-captures goes with --calibration" in capsys.readouterr().err


def test_replay_refuses_a_run_the_gpu_profile_cannot_hold(trace: Path, capsys) -> None:
    argv = ["replay", str(trace), "--model", "jamba-1.5-mini", "--memory", "1GiB"]
    assert main(argv) == 2  # 96 GiB of bf16 weights on an 80 GB H100
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "jamba-1.5-mini cannot run on NVIDIA H100 80 GB SXM (h100): weights 96.1 GiB" in err
    cache = [
        "replay",
        str(trace),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "12GiB",
        "--profile",
        "rtx3060",
    ]
    assert main(cache) == 2  # a 12 GiB cache on a 12 GB card
    assert "cache 12.0 GiB" in capsys.readouterr().err
    assert main([*argv, "--ignore-feasibility", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(LAYOUTS)


def test_replay_ssm_dtype_doubles_the_state(trace: Path, capsys) -> None:
    base = [
        "replay",
        str(trace),
        "--model",
        "nemotron-h-8b",
        "--memory",
        "1GiB",
        "--json",
        "--allocators",
        "avmp",
    ]
    runs = {}
    for dtype in ("bf16", "fp32", "auto"):
        assert main([*base, "--ssm-dtype", dtype]) == 0
        result = json.loads(capsys.readouterr().out)[0]
        result.pop("measured_allocator_cpu_s")  # this machine's wall clock, not a result
        runs[dtype] = result
    assert runs["auto"] == runs["fp32"] != runs["bf16"]  # Nemotron-H: fp32 in vLLM and SGLang
    assert main([*base, "--ssm-dtype", "fp8"]) == 2
    assert "--ssm-dtype must be one of auto, bf16, fp16, fp32, got 'fp8'" in capsys.readouterr().err


def test_replay_static_options_change_only_the_static_row(trace: Path, capsys) -> None:
    base = [
        "replay",
        str(trace),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "256MiB",
        "--json",
        "--allocators",
        "avmp,static",
    ]
    runs = []
    for extra in ([], ["--static-options", "radix_cache_cap"]):
        assert main([*base, *extra]) == 0
        results = json.loads(capsys.readouterr().out)
        runs.append(
            {
                r["allocator"]: {k: v for k, v in r.items() if not k.startswith("measured")}
                for r in results
            }
        )
    assert runs[0]["avmp"] == runs[1]["avmp"]
    assert runs[0]["static"] != runs[1]["static"]


def test_replay_policy_options(trace: Path, capsys) -> None:
    base = [
        "replay",
        str(trace),
        "--model",
        "granite-4.0-h-micro",
        "--memory",
        "1GiB",
        "--json",
        "--allocators",
        "avmp",
    ]
    assert (
        main([*base, "--preemption", "recompute", "--admission", "greedy", "--host-tier", "0"]) == 0
    )
    (result,) = json.loads(capsys.readouterr().out)
    assert result["policy"] == {
        "preemption": "recompute",
        "admission": "greedy",
        "host_tier_bytes": 0,
    }
    assert main([*base, "--host-tier", "8GiB"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["policy"] == {
        "preemption": "auto",
        "admission": "reserve",
        "host_tier_bytes": 8 << 30,
    }
    assert main([*base, "--preemption", "swap", "--host-tier", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a host tier" in err
    assert main([*base, "--host-tier", "lots"]) == 2
    assert "--host-tier: bad size 'lots'" in capsys.readouterr().err


def test_workers_replay_the_allocators_at_once_with_the_same_results(
    trace: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 2 runs the allocators in spawned processes: the same JSON as one at a
    time; where processes cannot start, the replays run in this process; a small trace
    runs here by default; a bad count is one line."""
    from avmp.cli import replay as replay_cli

    argv = ["replay", str(trace), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--allocators", "avmp,static,unified", "--json"]  # fmt: skip

    def results() -> list[dict]:  # less the measured CPU time, which no two runs share
        return [{k: v for k, v in r.items() if not k.startswith("measured_")}
                for r in json.loads(capsys.readouterr().out)]  # fmt: skip

    assert main([*argv, "--workers", "1"]) == 0
    alone = results()
    assert main([*argv, "--workers", "2"]) == 0
    assert results() == alone

    class NoProcesses:
        def Manager(self):  # noqa: N802 (multiprocessing's name)
            raise OSError("no /dev/shm here")

    monkeypatch.setattr("multiprocessing.get_context", lambda _method: NoProcesses())
    assert main([*argv, "--workers", "3"]) == 0
    assert results() == alone

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a 12-request trace started processes")

    monkeypatch.setattr(replay_cli, "_replay_on_processes", must_not_run)
    assert main(argv) == 0  # 12 requests: below PARALLEL_FROM, one at a time
    assert results() == alone
    for bad in ("0", "two"):
        assert main([*argv, "--workers", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--workers must be a whole number >= 1" in err[0]


def _without_measured(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("measured_")} for r in results]


def test_replay_takes_a_config_json_or_a_checkpoint_directory(
    trace: Path, tmp_path: Path, capsys
) -> None:
    from avmp.models.zoo import zoo_config

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(zoo_config("granite-4.0-h-micro")))
    runs = []
    for model in ("granite-4.0-h-micro", str(checkpoint / "config.json"), str(checkpoint)):
        argv = ["replay", str(trace), "--model", model, "--memory", "1GiB", "--json",
                "--allocators", "avmp,static"]  # fmt: skip
        assert main(argv) == 0
        runs.append(_without_measured(json.loads(capsys.readouterr().out)))
    assert runs[0] == runs[1] == runs[2]
    argv = ["replay", str(trace), "--model", str(tmp_path), "--memory", "1GiB"]
    assert main(argv) == 2  # a directory without config.json
    assert (
        capsys.readouterr().err == f"avmp replay: error: no config file at {tmp_path}/config.json\n"
    )


def test_replay_batch_limits(trace: Path, capsys) -> None:
    base = ["replay", str(trace), "--model", "granite-4.0-h-micro", "--memory", "1GiB",
            "--json", "--allocators", "avmp"]  # fmt: skip

    def replayed(*extra: str) -> dict:
        assert main([*base, *extra]) == 0
        return _without_measured(json.loads(capsys.readouterr().out))[0]

    default = replayed()
    assert replayed("--max-num-seqs", "256", "--max-num-batched-tokens", "8192") == default
    one_at_a_time = replayed("--max-num-seqs", "1")
    assert one_at_a_time["num_completed"] == 12
    assert one_at_a_time["makespan_s"] > default["makespan_s"]
    small_steps = replayed("--max-num-batched-tokens", "64")
    assert small_steps["num_steps"] > default["num_steps"]
    assert main([*base[:-3], "--max-num-seqs", "4"]) == 0
    assert "at most 4 requests and 8192 tokens a step" in capsys.readouterr().out
    for flag in ("--max-num-seqs", "--max-num-batched-tokens"):
        assert main([*base, flag, "0"]) == 2
        assert capsys.readouterr().err == f"avmp replay: error: {flag} must be >= 1, got 0\n"
