"""The engine benchmark's batch-1 prologue comparison: medians over rounds, each
setting against the unfused steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine import PROLOGUE_SETTINGS, _prologue_lines


def _round(step_ms: float, device_ms: float, roof: float) -> dict[str, float]:
    return {"decode_step_s": step_ms / 1e3, "decode_device_s": device_ms / 1e3,
            "roofline_fraction": roof}  # fmt: skip


def test_prologue_table_reports_medians_and_ratios_to_unfused() -> None:
    row = {"batch": 1, "rounds": {
        "unfused": [_round(3.5, 3.4, 0.61), _round(3.4, 3.3, 0.63), _round(3.6, 3.5, 0.60)],
        "fused": [_round(3.1, 3.0, 0.69), _round(3.0, 2.9, 0.71), _round(3.2, 3.1, 0.67)],
        "fused_pdl": [_round(2.8, 2.7, 0.76), _round(2.9, 2.8, 0.74), _round(2.7, 2.6, 0.79)],
    }}  # fmt: skip
    lines = _prologue_lines(row)
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "3 rounds" in lines[1]
    assert table["unfused"] == "| unfused | 3.50 / 3.40 / 3.60 | 3.40 | 61% | 1.00x |"
    assert table["fused"].endswith("| 3.00 | 69% | 1.13x |")  # 3.5 / 3.1
    assert table["fused_pdl"].endswith("| 2.70 | 76% | 1.25x |")  # 3.5 / 2.8
    assert list(PROLOGUE_SETTINGS) == ["unfused", "fused", "fused_pdl"]


def test_skinny_table_reports_each_setting_against_cublas() -> None:
    from benchmarks.engine import SKINNY_SETTINGS, _skinny_lines

    row = {"batch": 64, "rounds": {
        "cublas": [_round(5.6, 5.5, 0.69), _round(5.7, 5.6, 0.68)],
        "folded": [_round(5.0, 4.9, 0.77), _round(5.2, 5.1, 0.75)],
    }}  # fmt: skip
    lines = _skinny_lines(row)
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "Batch-64 decode" in lines[1] and "2 rounds" in lines[1]
    assert table["cublas"] == "| cublas | 5.60 / 5.70 | 5.55 | 68% | 1.00x |"
    assert table["folded"].endswith("| 5.00 | 76% | 1.11x |")  # 5.65 / 5.1
    assert list(SKINNY_SETTINGS)[0] == "cublas" and SKINNY_SETTINGS["cublas"]["skinny_rows"] == 0
    assert SKINNY_SETTINGS["skinny_pdl_prefetch"]["skinny_prefetch"] is None  # the default
    assert SKINNY_SETTINGS["folded"]["fold_parts"] and SKINNY_SETTINGS["folded"]["fold_conv"]
    # the activation epilogue from its setting on (the wide conv and each fold alone add
    # to it); "folded" (both folds) is measured without it, as in session 22
    with_act = [label for label, s in SKINNY_SETTINGS.items() if s["act_epilogue"]]
    assert with_act == ["act_epilogue", "wide_conv", "balanced", "defer_sums", "stacked",
                        "attention_out", "long_parts", "prefetch_2k", "prefetch_8k",
                        "fold_parts", "fold_conv"]  # fmt: skip
    assert [label for label, s in SKINNY_SETTINGS.items() if s["wide_conv"]] == [
        "wide_conv", "balanced", "defer_sums", "stacked", "attention_out", "long_parts",
        "prefetch_2k", "prefetch_8k"]
    assert [label for label, s in SKINNY_SETTINGS.items() if s["defer_sums"]] == [
        "defer_sums", "stacked", "attention_out", "long_parts", "prefetch_2k", "prefetch_8k"]
    assert [label for label, s in SKINNY_SETTINGS.items() if s["stack_linears"]] == [
        "stacked", "attention_out", "long_parts", "prefetch_2k", "prefetch_8k"]
    assert [label for label, s in SKINNY_SETTINGS.items() if s["attention_out"]] == [
        "attention_out", "long_parts", "prefetch_2k", "prefetch_8k"]
    assert [label for label, s in SKINNY_SETTINGS.items() if s["long_parts"]] == ["long_parts"]
    assert [s["skinny_prefetch"] for s in SKINNY_SETTINGS.values() if s["skinny_prefetch"]] == [
        2048, 8192]
    assert [label for label, s in SKINNY_SETTINGS.items() if s["balanced"]] == ["balanced"]


def test_skinny_settings_pick_the_comparison_and_its_baseline() -> None:
    from benchmarks.engine import _skinny_lines, parse_args

    args = parse_args(["--skinny-settings", "act_epilogue", "fold_parts"])
    assert args.skinny_settings == ["act_epilogue", "fold_parts"]
    assert parse_args([]).skinny_settings is None  # all of them
    row = {"batch": 64, "rounds": {
        "act_epilogue": [_round(5.3, 5.2, 0.73)], "fold_parts": [_round(5.5, 5.4, 0.70)],
    }}  # fmt: skip
    table = [line for line in _skinny_lines(row) if line.startswith("| fold_parts")]
    assert "vs act_epilogue" in "\n".join(_skinny_lines(row))
    assert table == ["| fold_parts | 5.50 | 5.40 | 70% | 0.96x |"]


def test_skinny_batches_default_to_the_largest_up_to_64() -> None:
    from benchmarks.engine import parse_args, skinny_batches

    assert skinny_batches(parse_args(["--batches", "1", "8", "64", "256"])) == [64]
    assert skinny_batches(parse_args(["--batches", "128", "256"])) == [128]
    args = parse_args(["--batches", "1", "64", "--skinny-batches", "8", "32"])
    assert skinny_batches(args) == [8, 32]


def test_compare_selects_the_comparisons() -> None:
    from benchmarks.engine import COMPARISONS, parse_args

    assert parse_args([]).compare == list(COMPARISONS)
    assert parse_args(["--compare", "skinny"]).compare == ["skinny"]
    assert parse_args(["--compare"]).compare == []


@pytest.mark.parametrize("content", [None, {"device": "x", "models": []}])
def test_an_unreadable_tuning_file_is_one_line_before_any_gpu_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: dict[str, Any] | None
) -> None:
    from benchmarks.common import write_result
    from benchmarks.engine import main

    path = tmp_path / "split.json.gz"
    if content is not None:  # an engine result, not a skinny_split one
        write_result(path, content)
    assert main(["--skinny-tuned", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cannot read --skinny-tuned {path}")
