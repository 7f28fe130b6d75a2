"""benchmarks.step_profile's large mixed step: its chunk, its ratios to its parts, the
kernels of the eager mixed step beside the eager chunk alone's, its arguments, and the
markdown of results with and without it (older files print exactly what the docs hold)."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import step_profile
from benchmarks.common import REPO_ROOT, RESULTS_DIR, read_result


def test_the_large_chunk_is_the_step_less_the_decodes() -> None:
    assert step_profile.large_chunk_tokens(8192, 64) == 8128
    with pytest.raises(ValueError, match="no prefill chunk beside 64 decodes"):
        step_profile.large_chunk_tokens(64, 64)


def test_bad_large_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--large-step", "64"], ["--large-step", "-1"], ["--large-context", "-5"]):
        with pytest.raises(SystemExit) as exit_info:
            step_profile.parse_args(argv)
        assert exit_info.value.code == 2
        assert "error: --large-" in capsys.readouterr().err
    assert step_profile.parse_args(["--large-step", "0"]).large_step == 0  # no large step
    args = step_profile.parse_args([])
    assert (args.large_step, args.large_context) == (8192, 8192)


def test_the_kernels_of_both_steps_stand_side_by_side() -> None:
    """Kernels of either step or both, the differences largest first (in either
    direction), the totals over every kernel, only ``rows`` rows shown."""
    mixed = {
        "scan": [5.0, 36],
        "gemm": [10.0, 84],
        "decode_attention": [0.3, 4],
        "norm": [1.0, 117],
    }
    alone = {
        "scan": [4.0, 36],
        "gemm": [10.2, 84],
        "prefill_attention": [0.5, 4],
        "norm": [1.0, 117],
    }
    table = step_profile.kernel_difference(mixed, alone, rows=4)
    assert table["mixed_gpu_ms"] == pytest.approx(16.3)
    assert table["alone_gpu_ms"] == pytest.approx(15.7)
    assert table["difference_ms"] == pytest.approx(0.6)
    assert table["num_kernels"] == 5
    assert [r["kernel"] for r in table["kernels"]] == [
        "scan", "prefill_attention", "decode_attention", "gemm",
    ]  # fmt: skip
    first = table["kernels"][0]
    assert (first["mixed_ms"], first["alone_ms"], first["difference_ms"]) == (5.0, 4.0, 1.0)
    assert (first["mixed_calls"], first["alone_calls"]) == (36, 36)
    only_alone = table["kernels"][1]
    assert (only_alone["mixed_ms"], only_alone["difference_ms"]) == (0.0, -0.5)
    assert table["kernels"][3]["difference_ms"] == pytest.approx(-0.2)


def test_kernel_times_average_the_three_profiled_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [SimpleNamespace(key="a" * 90, self_device_time_total=3000.0, count=6),
              SimpleNamespace(key="launcher", self_device_time_total=0.0, count=3)]  # fmt: skip
    monkeypatch.setattr(step_profile, "kernel_events", lambda runner, work: events)
    assert step_profile.kernel_times(None, []) == {"a" * 90: [1.0, 2.0]}
    table = step_profile.kernel_difference(step_profile.kernel_times(None, []), {})
    assert table["kernels"][0]["kernel"] == "a" * 80  # names cut as in the other tables


def test_the_large_step_is_compared_to_its_parts() -> None:
    large = {"decode_graph_ms": 5.0, "chunk_graph_ms": 100.0, "chunk_eager_ms": 110.0,
             "mixed_graph_ms": 126.0, "mixed_eager_ms": 138.6}  # fmt: skip
    ratios = step_profile.large_ratios(large)
    assert ratios["parts_graph_ms"] == 105.0 and ratios["ratio_graph"] == pytest.approx(1.2)
    assert ratios["parts_eager_ms"] == 115.0
    assert ratios["ratio_eager"] == pytest.approx(138.6 / 115.0)


def with_large(results: dict[str, Any]) -> dict[str, Any]:
    results = copy.deepcopy(results)
    kernels = step_profile.kernel_difference(
        {"_chunk_scan_kernel": [3.5, 36], "_decode_attention_kernel": [0.2, 4]},
        {"_chunk_scan_kernel": [3.0, 36]},
    )
    for m in results["models"]:
        m["large"] = {"chunk_tokens": 8128, "context": 8192, "decode_graph_ms": 4.92,
                      "chunk_graph_ms": 110.0, "chunk_eager_ms": 120.0, "mixed_graph_ms": 130.0,
                      "mixed_eager_ms": 140.0, "mixed_graph": True, "chunk_graph": True,
                      "mixed_bucket": [8192, 128], "chunk_bucket": [8192, 1],
                      "kernels": kernels}  # fmt: skip
        m["large"].update(step_profile.large_ratios(m["large"]))
    return results


def test_markdown_shows_the_large_step_and_its_kernel_differences() -> None:
    old = read_result(RESULTS_DIR / "step_profile_graphs_h200.json.gz")
    text = step_profile.markdown(with_large(old))
    lines = iter(text.splitlines())  # the old lines all there, in order, unchanged
    assert all(line in lines for line in step_profile.markdown(old).splitlines())
    assert (
        "Large mixed step: 64 decodes of 512 cached tokens and a chunk of 8,128 tokens "
        "after 8,192 cached tokens of its own prompt."
    ) in text
    assert "| chunk alone, CUDA graph, padded to 8192 tokens, 1 rows | 110.00 |" in text
    assert (
        "| decodes + chunk in one step, CUDA graph, padded to 8192 tokens, 128 rows | 130.00 |"
        in text
    )
    assert f"| mixed graph / (decode graph + chunk graph) | {130 / 114.92:.2f}x |" in text
    assert f"| mixed eager / (decode graph + chunk eager) | {140 / 124.92:.2f}x |" in text
    assert (
        "GPU time of the eager large mixed step 3.70 ms, of the eager chunk alone 3.00 ms "
        "(+0.70 ms over 2 kernels)"
    ) in text
    assert "| `_chunk_scan_kernel` | 3.500 | 3.000 | +0.500 | 36 / 36 |" in text
    assert "| `_decode_attention_kernel` | 0.200 | 0.000 | +0.200 | 4 / 0 |" in text
    assert text.count("Large mixed step:") == 2


def test_old_results_print_what_the_docs_hold() -> None:
    """The session-7 H200 file, from before the large step, prints lines all in
    docs/BENCHMARKS.md (the H100 one is checked by test_engine_reports)."""
    text = step_profile.markdown(read_result(RESULTS_DIR / "step_profile_graphs_h200.json.gz"))
    docs = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert "Large mixed step" not in text
    missing = [line for line in text.splitlines() if line.strip() and line not in docs]
    assert not missing, missing[:3]
