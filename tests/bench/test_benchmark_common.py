"""benchmarks/common.py: the one result format (compact JSON, gzip by name), paths as
results record them, and the measurement helpers the scripts share; the committed
results read back through it and name no machine's directories."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from avmp.sim.calibration import load_calibration
from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    copy_bytes_per_s,
    measure_or_redraw,
    read_result,
    rel_error,
    repo_path,
    write_result,
)

# Read by the library itself (`avmp bench --calibration`, avmp.sim.timing's default
# allocator-call costs), so kept as plain JSON.
LIBRARY_INPUTS = ("calibration_*.json", "allocator_calls.json")

RESULT = {"device": "test µ", "ms": [0.1, 1e-300, 12345.678901234567], "nan": math.nan,
          "nested": {"cells": [{"m": 1, "ok": True, "none": None}]}}


@pytest.mark.parametrize("name", ["r.json.gz", "r.json"])
def test_results_read_back_exactly(tmp_path: Path, name: str) -> None:
    path = write_result(tmp_path / "sub" / name, RESULT)
    back = read_result(path)
    assert math.isnan(back.pop("nan"))
    assert back == {k: v for k, v in RESULT.items() if k != "nan"}
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, renamed
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    text = gzip.decompress(raw) if name.endswith(".gz") else raw
    assert b"\n" not in text.rstrip(b"\n") and b": " not in text  # compact: one line


def test_the_same_result_gives_the_same_bytes(tmp_path: Path) -> None:
    first = write_result(tmp_path / "a.json.gz", RESULT).read_bytes()
    assert write_result(tmp_path / "a.json.gz", RESULT).read_bytes() == first


def test_plain_results_are_what_the_library_reads(tmp_path: Path) -> None:
    """benchmarks/engine.py writes calibrations through write_result; avmp loads them."""
    points = [{"num_prefill_tokens": p, "num_decode_requests": d, "num_context_tokens": c,
               "num_requests": max(1, d), "step_s": 0.004 + 2e-5 * p + 3e-5 * d + 1e-8 * c}
              for p, d, c in ((512, 0, 512), (0, 8, 4000), (0, 32, 9000), (100, 4, 3000),
                              (2048, 0, 2048), (0, 1, 700))]  # fmt: skip
    path = write_result(tmp_path / "calibration.json", {"gpu": "g", "points": points})
    assert load_calibration(path).num_points == len(points)


def test_older_indented_files_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"a": [1, 2]}, indent=2))
    assert read_result(path) == {"a": [1, 2]}


@pytest.mark.parametrize("raw", [b"\x1f\x8b\x08junk", b"{not json", b"\xff\xfe\x00binary"])
def test_a_corrupt_result_is_an_error_naming_the_file(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "broken.json.gz"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="broken.json.gz: not a benchmark result"):
        read_result(path)
    with pytest.raises(FileNotFoundError):
        read_result(tmp_path / "absent.json.gz")


def test_paths_are_recorded_relative_to_the_repo_or_by_name(tmp_path: Path) -> None:
    trace = REPO_ROOT / "benchmarks" / "traces" / "sharegpt_vllm_600.jsonl"
    assert repo_path(trace) == "benchmarks/traces/sharegpt_vllm_600.jsonl"
    assert repo_path(tmp_path / "out" / "calibration.json") == "calibration.json"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.items() for v in item for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _committed() -> list[Path]:
    return sorted(p for p in RESULTS_DIR.iterdir() if p.is_file())


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.name)
def test_committed_results_read_and_name_no_absolute_path(path: Path) -> None:
    result = read_result(path)
    absolute = [s for s in _strings(result) if s.startswith(("/", "~")) or s[1:3] == ":\\"]
    assert not absolute, absolute[:3]
    library_input = any(path.match(pattern) for pattern in LIBRARY_INPUTS)
    assert path.name.endswith(".json" if library_input else ".json.gz")


def test_kernels_script_no_longer_shadows_a_top_level_kernels_module() -> None:
    """benchmarks/kernels.py is benchmarks.kernels; a bare `kernels` (the Hugging Face
    package transformers probes for) never resolves to it."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or "benchmarks" not in Path(spec.origin).parts


def test_rel_error() -> None:
    torch = pytest.importorskip("torch")
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0
    assert rel_error(torch.tensor([3.0, 4.0 + 5.0]), ref) == pytest.approx(1.0)
    assert rel_error(torch.zeros(3), torch.zeros(3)) == 0.0  # no 0 / 0


def test_copy_bandwidth_counts_bytes_read_and_written() -> None:
    pytest.importorskip("torch")
    calls: list[object] = []

    def two_ms(fn: Any) -> float:
        calls.append(fn())
        return 2.0

    assert copy_bytes_per_s("cpu", 1 << 20, two_ms) == 2 * (1 << 20) / 2e-3
    assert len(calls) == 1


def test_redrawing_a_missing_or_broken_result_is_one_line(tmp_path: Path) -> None:
    """`measure_or_redraw` with ``--markdown`` of a file that is not there, or not a
    result: one line naming the script and the file, exit status 1, no traceback."""
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"{not json")
    for path, message in ((tmp_path / "absent.json.gz", "no such results file"),
                          (broken, "not a benchmark result")):  # fmt: skip
        args = argparse.Namespace(markdown=str(path), out=None)
        with pytest.raises(SystemExit) as exit_info:
            measure_or_redraw(args, "benchmarks.x", lambda: {}, str)
        text = str(exit_info.value.code)
        assert text.startswith("benchmarks.x: ") and message in text and "\n" not in text
        assert path.name in text
