"""`avmp plan --tensor-parallel N`: one rank's units, each GPU's memory, and one clear
line for every split that cannot be."""

from __future__ import annotations

import json

import pytest

from avmp.cli import main
from avmp.models import resolve_model
from avmp.models.tensor_parallel import rank_geometry
from avmp.sim.timing import activation_bytes, get_profile

GIB = 1 << 30
NEMOTRON = ["plan", "nemotron-h-47b", "--memory", "64GiB", "--prompt", "512", "--output", "256"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _requests(data: dict[str, object], name: str) -> int:
    rows = {row["name"]: row for row in data["allocators"]}  # type: ignore[attr-defined]
    return int(rows[name]["num_requests"])


def test_a_split_plans_one_ranks_units_and_reports_each_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    whole = run_json(capsys, *NEMOTRON)
    assert "tensor_parallel" not in whole  # without the option: the plan as before
    split = run_json(capsys, *NEMOTRON, "--tensor-parallel", "4")
    geometry = resolve_model("nemotron-h-47b")
    rank = rank_geometry(geometry, 4)
    assert split["kv_bytes_per_token"] == geometry.kv_bytes_per_token // 4
    assert split["state_bytes_per_request"] == geometry.state_bytes_per_request // 4
    gpus = split["tensor_parallel"]
    assert gpus == {  # type: ignore[comparison-overlap]
        "num_gpus": 4,
        "profile": "h200",
        "weight_bytes": rank.weight_bytes,
        "cache_bytes": 64 * GIB,
        "activation_bytes": activation_bytes(rank, 8192, 256),
        "device_bytes": get_profile("h200").memory_bytes,
        "needed_bytes": rank.weight_bytes + 64 * GIB + activation_bytes(rank, 8192, 256),
        "room_for_cache_bytes": get_profile("h200").memory_bytes
        - rank.weight_bytes
        - activation_bytes(rank, 8192, 256),
    }
    # each GPU's 64 GiB holds a quarter of every request: about four times as many
    assert 3.9 * _requests(whole, "oracle") <= _requests(split, "oracle")
    assert _requests(split, "avmp") >= 0.99 * _requests(split, "oracle")


def test_the_text_plan_says_what_each_gpu_holds(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "nemotron-h-47b", "--memory", "32GiB", "--tensor-parallel", "2"]
    assert main([*argv, "--profile", "h100"]) == 0
    out = capsys.readouterr().out
    assert "2 x NVIDIA H100 80 GB SXM (h100), each holding 1/2 of every unit" in out
    assert "per GPU: weights 43.6 GiB + cache 32.0 GiB + activations 2.1 GiB" in out


def test_a_profile_alone_checks_one_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "plan", "jamba-1.5-mini", "--memory", "12GiB", "--profile", "h200")
    assert data["tensor_parallel"]["num_gpus"] == 1  # type: ignore[index]
    assert data["tensor_parallel"]["weight_bytes"] == resolve_model("jamba-1.5-mini").weight_bytes  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([*NEMOTRON, "--tensor-parallel", "0"], "--tensor-parallel must be in 1..8"),
        ([*NEMOTRON, "--tensor-parallel", "16"], "--tensor-parallel must be in 1..8"),
        ([*NEMOTRON, "--tensor-parallel", "two"], "whole number of GPUs, got 'two'"),
        (
            [*NEMOTRON, "--tensor-parallel", "3"],
            "nemotron-h-47b on 3 GPUs: attention heads (64) do not split evenly over 3 ranks",
        ),
        (
            ["plan", "falcon-h1-7b", "--memory", "8GiB", "--tensor-parallel", "8"],
            "attention heads (12) do not split evenly over 8 ranks",
        ),
        (
            ["plan", "jamba-1.5-large", "--memory", "32GiB", "--tensor-parallel", "2"],
            "per GPU weights 371.2 GiB + cache 32.0 GiB",
        ),
        (
            ["plan", "jamba-1.5-large", "--memory", "32GiB", "--tensor-parallel", "4"],
            "--tensor-parallel 8 holds it",
        ),
        (
            ["plan", "nemotron-h-47b", "--memory", "120GiB", "--tensor-parallel", "1"],
            "give at most 51.7 GiB of --memory",
        ),
        ([*NEMOTRON, "--tensor-parallel", "2", "--profile", "b200"], "unknown GPU profile"),
    ],
)
def test_a_split_that_cannot_be_is_one_line_and_exit_code_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avmp plan: error:")
    assert expected in lines[0]


def test_jamba_large_fits_eight_h200s_in_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "jamba-1.5-large", "--memory", "32GiB", "--tensor-parallel", "8"]
    data = run_json(capsys, *argv)
    gpus = data["tensor_parallel"]
    assert gpus["weight_bytes"] < gpus["device_bytes"]  # type: ignore[index]
    assert _requests(data, "avmp") > 0
