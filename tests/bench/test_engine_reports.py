"""The engine benchmarks' CPU side: the replay of benchmarks/engine_replay.py runs every
layout on a tiny model, and the docs tables of all three GPU benchmarks are rebuilt from
the committed results (what docs/BENCHMARKS.md shows)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from avmp.engine.tiny import tiny_model  # noqa: E402
from avmp.models.geometry import ConvColumns  # noqa: E402
from avmp.models.zoo import zoo_config  # noqa: E402
from avmp.sched.request import RequestSpec  # noqa: E402
from benchmarks.common import REPO_ROOT, RESULTS_DIR, read_result  # noqa: E402


def load(name: str) -> ModuleType:
    """The benchmark script ``benchmarks/<name>.py``."""
    return importlib.import_module(f"benchmarks.{name}")


def calibration(path: Path) -> Path:
    """A step-time calibration without a model name (any geometry may load it)."""
    points = [
        {"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
         "num_requests": r, "step_s": 0.004 + 2e-5 * p + 3e-5 * d + 1e-8 * c}
        for p, d, c, r in ((512, 0, 512, 1), (0, 8, 4000, 8), (0, 32, 9000, 32),
                           (100, 4, 3000, 5), (2048, 0, 2048, 2), (0, 1, 700, 1))
    ]  # fmt: skip
    path.write_text(json.dumps({"gpu": "test", "points": points}))
    return path


def test_replay_runs_every_layout_and_the_simulator_agrees_on_decisions(tmp_path: Path) -> None:
    replay = load("engine_replay")
    model = tiny_model(zoo_config("granite-4.0-h-tiny"), seed=0)
    trace = [RequestSpec(i, 0.0, 5 + 7 * i, 3 + i % 4) for i in range(8)]
    argv = ["--device", "cpu", "--memory", "4MiB", "--max-num-seqs", "4"]
    args = replay.parse_args([*argv, "--calibration", str(calibration(tmp_path / "c.json"))])
    geometry = model.geometry(next(model.parameters()).dtype, None, ConvColumns.VLLM)
    geometry = dataclasses.replace(geometry, name="tiny")
    for allocator in ("avmp", "static", "unified"):
        engine = replay.replay(args, model, allocator, trace)
        sim = replay.simulate(args, geometry, allocator, trace)
        assert engine["num_completed"] == len(trace) == sim["num_completed"]
        assert engine["num_steps"] == sim["num_steps"]  # one scheduler, one allocator
        assert engine["num_preemptions"] == sim["num_preemptions"]
        assert engine["timeline"] and sim["timeline"]


def test_replay_report_states_the_ratios_of_its_results(tmp_path: Path) -> None:
    replay = load("engine_replay")
    results = read_result(RESULTS_DIR / "engine_replay_h100.json.gz")
    text = replay.markdown(results)
    runs = {run["allocator"]: run for run in results["runs"]}
    measured = (
        runs["avmp"]["engine"]["request_throughput"]
        / runs["static"]["engine"]["request_throughput"]
    )
    assert f"AVMP / static: {measured:.2f}x measured" in text
    assert all(f"| {name} |" in text for name in runs)
    replay.plot(results, tmp_path / "split.png")
    assert (tmp_path / "split.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("script", "results"),
    [
        ("engine", "engine_h100.json.gz"),
        ("step_profile", "step_profile_h100.json.gz"),
        ("engine_replay", "engine_replay_h100.json.gz"),
    ],
)
def test_docs_show_the_tables_the_committed_results_give(script: str, results: str) -> None:
    """Every line a GPU benchmark prints for its committed results is in the docs."""
    text = load(script).markdown(read_result(RESULTS_DIR / results))
    docs = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    missing = [line for line in text.splitlines() if line.strip() and line not in docs]
    assert not missing, missing[:3]
