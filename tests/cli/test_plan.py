"""`avmp plan` end to end: the table, the JSON, and one clear line for every mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avmp.cli import main
from avmp.models import zoo_config, zoo_names

JAMBA = ["plan", "jamba-1.5-mini", "--memory", "12GiB", "--prompt", "512", "--output", "256"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # JSON only: any other line would fail here


def test_plan_prints_table_and_unified_explanation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(JAMBA) == 0
    out = capsys.readouterr().out
    assert "vLLM's block size: 80 tokens" in out
    assert "break-even length 532 tokens" in out
    header = next(line for line in out.splitlines() if line.startswith("allocator"))
    for column in ("requests", "vs oracle", "padding", "rounding", "unusable"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    assert {"avmp", "unified", "static", "oracle"} <= rows.keys()
    assert "Why unified loses" in out
    assert "each state page is padded by 16.0 KiB" in out
    assert "7 state" in out and "10 KV blocks" in out


def test_plan_json_has_avmp_within_one_percent_of_oracle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = run_json(capsys, *JAMBA)
    rows = {row["name"]: row for row in data["allocators"]}  # type: ignore[attr-defined]
    assert rows["avmp"]["num_requests"] >= 0.99 * rows["oracle"]["num_requests"]
    assert data["vllm_block_size"] == 80
    assert data["break_even_tokens"] == 532


def test_plan_options_change_the_result(capsys: pytest.CaptureFixture[str]) -> None:
    base = run_json(capsys, *JAMBA)
    fp32 = run_json(capsys, *JAMBA, "--ssm-dtype", "fp32")
    assert fp32["vllm_block_size"] == 144
    assert fp32["state_bytes_per_request"] > base["state_bytes_per_request"]  # type: ignore[operator]
    split = run_json(capsys, *JAMBA, "--state-fraction", "0.4")

    def static(data: dict[str, object]) -> int:
        rows = {row["name"]: row for row in data["allocators"]}  # type: ignore[attr-defined]
        return int(rows["static"]["num_requests"])

    assert static(split) > static(base)  # Jamba at 768 tokens needs ~41% of memory for state
    chunked = run_json(capsys, *JAMBA, "--chunk", "64MiB")
    assert chunked["chunk_bytes"] == 64 << 20


def test_plan_reads_a_config_json_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(zoo_config("jamba-1.5-mini")))
    data = run_json(capsys, "plan", str(path), "--memory", "12GiB")
    assert data["vllm_block_size"] == 80


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["no-such-model", "--memory", "12GiB"], "jamba-1.5-mini"),
        (["jamba-1.5-mini", "--memory", "12 GiB"], "12 GiB"),
        (["jamba-1.5-mini", "--memory", "-1"], "-1"),
        (["jamba-1.5-mini"], "--memory is required"),
        (["jamba-1.5-mini", "--memory", "1MiB"], "chunk"),
        (["jamba-1.5-mini", "--memory", "12GiB", "--chunk", "3MiB"], "2 MiB"),
        (["jamba-1.5-mini", "--memory", "12GiB", "--prompt", "0"], "--prompt"),
        (["jamba-1.5-mini", "--memory", "12GiB", "--output", "x"], "--output"),
        (["jamba-1.5-mini", "--memory", "12GiB", "--ssm-dtype", "fp8"], "auto, bf16, fp16, fp32"),
        (["jamba-1.5-mini", "--memory", "12GiB", "--state-fraction", "1"], "(0, 1)"),
        (["jamba-1.5-mini", "--memory", "64MiB", "--prompt", "100000"], "whole budget"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avmp plan: error:")
    assert expected in lines[0]


def test_unknown_model_lists_every_known_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "jamba-9", "--memory", "12GiB"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in zoo_names())


def test_malformed_config_names_the_missing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096}))
    assert main(["plan", str(path), "--memory", "12GiB"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model_type" in err


def test_installed_console_script_runs() -> None:
    script = Path(sys.executable).with_name("avmp")
    assert script.exists(), "the avmp console script is not installed in this environment"
    done = subprocess.run(
        [str(script), *JAMBA, "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["vllm_block_size"] == 80
    bad = subprocess.run(
        [str(script), "plan", "jamba-1.5-mini", "--memory", "12 GiB"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_unconfirmed_zoo_configs_carry_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--memory", "4GiB", "--prompt", "512", "--output", "128"]
    assert main([*argv[:1], "granite-4.0-h-micro", *argv[1:]]) == 0
    assert "not confirmed" in capsys.readouterr().err
    assert main([*argv[:1], "jamba-1.5-mini", *argv[1:]]) == 0
    assert "not confirmed" not in capsys.readouterr().err


def test_plan_with_vllms_fp32_state_gives_real_vllms_107_requests(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real vLLM 0.33 fits 107 requests of 512 + 256 tokens of Nemotron-H-8B in 12 GiB
    with its default fp32 SSM state (docs/reference PEERS.md, "Added 2026-12")."""
    nemotron = ["plan", "nemotron-h-8b", "--memory", "12GiB", "--prompt", "512",
                "--output", "256"]
    for dtype in ("fp32", "auto"):  # auto: vLLM and SGLang keep Nemotron-H's state in fp32
        data = run_json(capsys, *nemotron, "--ssm-dtype", dtype)
        rows = {row["name"]: row for row in data["allocators"]}  # type: ignore[attr-defined]
        assert rows["unified"]["num_requests"] == 107
        assert data["vllm_block_size"] == 1040
    bf16 = run_json(capsys, *nemotron)  # the default stays bf16
    assert bf16["vllm_block_size"] == 528


def test_plan_ssm_dtype_auto_is_bf16_for_jamba_and_fp16_as_large_as_bf16(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_json(capsys, *JAMBA, "--ssm-dtype", "auto") == run_json(capsys, *JAMBA)
    fp16 = run_json(capsys, *JAMBA, "--ssm-dtype", "fp16")
    assert fp16["state_bytes_per_request"] == run_json(capsys, *JAMBA)["state_bytes_per_request"]


def test_plan_static_options_are_sglangs_shipped_split(
    capsys: pytest.CaptureFixture[str],
) -> None:
    jamba_8 = ["plan", "jamba-1.5-mini", "--memory", "8GiB", "--prompt", "512", "--output", "256"]

    def static(data: dict[str, object]) -> dict[str, int]:
        rows = {row["name"]: row for row in data["allocators"]}  # type: ignore[attr-defined]
        return rows["static"]  # type: ignore[no-any-return]

    plain = static(run_json(capsys, *jamba_8))
    shipped = static(run_json(capsys, *jamba_8, "--static-options", "padding_slot,give_back"))
    capped = static(run_json(capsys, *jamba_8, "--static-options", "radix_cache_cap"))
    assert shipped["padding_bytes"] > plain["padding_bytes"] == 0  # the held slot
    assert capped["num_requests"] < plain["num_requests"]  # a third of the slots
    assert main([*jamba_8, "--static-options", "padding"]) == 2
    assert "unknown static option 'padding'; known: padding_slot" in capsys.readouterr().err


def test_python_dash_m_avmp_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "avmp", *JAMBA, "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["vllm_block_size"] == 80
