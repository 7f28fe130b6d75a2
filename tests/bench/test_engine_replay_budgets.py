"""benchmarks/engine_replay.py --simulate-only: every layout simulated at several cache
budgets on the CPU beside `avmp plan`'s capacity, the ratios and issue 12's criteria
computed from those figures, the table printed again from the saved file, and the
mistakes that are one line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from avmp.bench.traces import write_jsonl  # noqa: E402
from avmp.cli import main as avmp_main  # noqa: E402
from avmp.sched.request import RequestSpec  # noqa: E402
from benchmarks import engine_replay as replay  # noqa: E402
from benchmarks.common import RESULTS_DIR, read_result, write_result  # noqa: E402

LAYOUTS = ["avmp", "static", "unified", "unified-shipped"]
BUDGETS = ["160MiB", "320MiB"]  # Granite-4.0-H-Micro: a few 37 MiB states each


def write_calibration(path: Path) -> Path:
    """A step-time calibration without a model name (any geometry may load it)."""
    points = [
        {"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
         "num_requests": r, "step_s": 0.004 + 2e-5 * p + 3e-5 * d + 1e-8 * c}
        for p, d, c, r in ((512, 0, 512, 1), (0, 8, 4000, 8), (0, 32, 9000, 32),
                           (100, 4, 3000, 5), (2048, 0, 2048, 2), (0, 1, 700, 1))
    ]  # fmt: skip
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "points": points}))
    return path


def sweep_argv(tmp: Path, *extra: str) -> list[str]:
    """A sweep of six requests, some longer than one page, all at t = 0."""
    trace = [RequestSpec(i, 0.0, 40 + 90 * i, 4 + 3 * (i % 3)) for i in range(6)]
    write_jsonl(trace, tmp / "t.jsonl")
    return [
        "--simulate-only", "--trace", str(tmp / "t.jsonl"), "--memory", *BUDGETS,
        "--allocators", *LAYOUTS, "--max-num-seqs", "4", "--max-batched-tokens", "256",
        "--calibration", str(write_calibration(tmp / "c.json")), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The sweep run once through main: its saved results and what it printed."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "r.json.gz"
    printed = tmp / "stdout.txt"  # capsys is function-scoped: stdout goes to a file
    with printed.open("w") as stream, contextlib.redirect_stdout(stream):
        assert replay.main([*sweep_argv(tmp, "--unbounded", "--out", str(out))]) == 0
    return read_result(out), printed.read_text()


def test_sweep_simulates_every_layout_at_every_budget(sweep: tuple[dict[str, Any], str]) -> None:
    results, _ = sweep
    assert results["kind"] == replay.SWEEP_KIND and results["layouts"] == LAYOUTS
    assert [row["memory"] for row in results["budgets"]] == BUDGETS
    assert results["sim_profile"] == "h200"  # the calibration's device prices the host link
    for row in results["budgets"]:
        assert set(row["sim"]) == set(LAYOUTS)
        for sim in row["sim"].values():
            assert sim["num_completed"] == 6 and sim["request_throughput"] > 0
            assert "timeline" not in sim  # a sweep's results stay small
    small, large = (row["memory_bytes"] for row in results["budgets"])
    assert (small, large) == (160 << 20, 320 << 20)
    unbounded = results["unbounded"]
    assert unbounded["sim"]["num_preemptions"] == 0 and unbounded["allocator"] == "avmp"


def test_sweep_capacity_is_what_avmp_plan_reports(
    sweep: tuple[dict[str, Any], str], capsys: pytest.CaptureFixture[str]
) -> None:
    results, _ = sweep
    for row in results["budgets"]:
        argv = ["plan", results["model"], "--memory", row["memory"], "--json"]
        assert avmp_main(argv) == 0
        planned = json.loads(capsys.readouterr().out)
        counts = {a["name"]: a["num_requests"] for a in planned["allocators"]}
        assert row["plan"] == counts
        assert counts["avmp"] > counts["static"] > 0  # the budgets hold some such requests


def test_ratios_and_criteria_come_from_the_simulated_figures(
    sweep: tuple[dict[str, Any], str],
) -> None:
    results, printed = sweep
    table = first_table(printed)
    assert len(table) == 2 + len(BUDGETS)  # header, rule, one row per budget
    for row, line in zip(results["budgets"], table[2:], strict=True):
        rate = {name: sim["request_throughput"] for name, sim in row["sim"].items()}
        ratios = replay.budget_ratios(row)
        assert ratios["static"] == rate["avmp"] / rate["static"]
        assert ratios["unified"] == rate["avmp"] / rate["unified"]
        assert ratios["unified-shipped"] == rate["avmp"] / rate["unified-shipped"]
        gain = row["plan"]["avmp"] / row["plan"]["unified"] - 1
        criteria = replay.budget_criteria(row)
        assert criteria["at_least_static"] == (ratios["static"] >= 1.3)
        assert criteria["half_capacity_gain"] == (ratios["unified"] - 1 >= gain / 2)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["memory"]
        assert cells[1:5] == [f"{rate[name]:.2f}" for name in LAYOUTS]
        assert cells[6] == f"{ratios['static']:.3f}x"
        assert cells[10:] == [{True: "yes", False: "no"}[held] for held in criteria.values()]


def first_table(printed: str) -> list[str]:
    """The lines of the first markdown table in ``printed``."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    return lines[start:end]


def test_step_kinds_add_up_to_each_run(sweep: tuple[dict[str, Any], str]) -> None:
    """Every simulated step is counted once, as decode-only or with prefill tokens, and
    the prefill tokens counted are the ones each run computed; the table shows each run."""
    results, printed = sweep
    runs = [sim for row in results["budgets"] for sim in row["sim"].values()]
    runs.append(results["unbounded"]["sim"])
    for sim in runs:
        decode, mixed = sim["step_kinds"]["decode"], sim["step_kinds"]["mixed"]
        assert decode["steps"] + mixed["steps"] == sim["num_steps"]
        assert decode["prefill_tokens"] == 0 and mixed["prefill_tokens"] > 0
        assert decode["seconds"] > 0 and mixed["seconds"] > 0
        assert 0 < sim["mean_running"] <= results["max_num_seqs"]
    kinds_table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(kinds_table) == len(first_table(printed)) + 2 + len(runs)


def hand_row(avmp: float, unified: float | None, static: float, plan: tuple[int, int]) -> dict:
    sims = {"avmp": avmp, "static": static, **({"unified": unified} if unified else {})}
    return {
        "sim": {name: {"request_throughput": rate} for name, rate in sims.items()},
        "plan": {"avmp": plan[0], "unified": plan[1], "static": 1, "oracle": plan[0]},
    }


@pytest.mark.parametrize(
    ("row", "expected"),
    [  # half of 35 / 33 - 1 is 3.03%: 1.04x meets it, 1.02x does not
        (hand_row(10.4, 10.0, 8.0, (35, 33)), (True, True, True)),
        (hand_row(10.2, 10.0, 7.9, (35, 33)), (True, False, False)),
        (hand_row(9.9, 10.0, 7.0, (33, 33)), (False, True, False)),
        (hand_row(10.0, None, 7.0, (33, 33)), (None, True, None)),  # unified not run
        (hand_row(10.0, 9.0, 7.0, (3, 0)), (True, True, None)),  # no unified capacity
    ],
)
def test_criteria_of_hand_made_rows(row: dict, expected: tuple[bool | None, ...]) -> None:
    assert tuple(replay.budget_criteria(row).values()) == expected


def test_markdown_prints_a_saved_sweep_again(
    sweep: tuple[dict[str, Any], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, printed = sweep
    saved = write_result(tmp_path / "again.json.gz", results)
    assert replay.main(["--markdown", str(saved)]) == 0
    assert capsys.readouterr().out == printed
    assert replay.main(["--markdown", str(saved), "--resimulate", str(saved)]) == 2
    assert "budget sweep has no engine runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "shift", "--memory", "1GiB", "2GiB"], "several --memory budgets need"),
        (["--simulate-only", "--workload", "shift", "--memory", "1GiB", "lots"],
         "--memory: bad size 'lots'"),
        (["--workload", "shift", "--memory", "1 GiB"], "--memory: bad size '1 GiB'"),
        (["--simulate-only", "--workload", "shift", "--markdown", "r.json"], "give one"),
        (["--simulate-only", "--workload", "shift", "--calibration", "nope.json"],
         "not a valid step-time calibration"),
    ],
)  # fmt: skip
def test_sweep_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert replay.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_one_budget_keeps_a_gpu_run_as_it_was() -> None:
    args = replay.parse_args(["--workload", "shift", "--memory", "1.5GiB"])
    assert args.memory == "1.5GiB" and args.memory_budgets == ["1.5GiB"]
    assert replay.parse_args([]).memory == "3GiB"


@pytest.mark.parametrize("name", ["sharegpt", "longdoc"])
def test_committed_sweeps_print_one_row_per_budget(name: str) -> None:
    """The committed H200 sweeps still read, on today's geometry, and print their rows."""
    results = read_result(RESULTS_DIR / f"engine_replay_{name}_h200_sim_budgets.json.gz")
    geometry = replay.sim_geometry(results["model"])
    assert results["sim_geometry"]["kv_bytes_per_token"] == geometry.kv_bytes_per_token
    text = replay.markdown(results)
    for row in results["budgets"]:
        ratio = replay.budget_ratios(row)["static"]
        assert f"| {row['memory']} | " in text and f"| {ratio:.3f}x |" in text
