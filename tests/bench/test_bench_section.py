"""benchmarks/bench_section.py: the docs section is regenerated from saved results only,
and only between its markers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from avmp.bench.sweep import SweepGrid, run_sweep
from benchmarks import bench_section as script


def test_section_replaces_only_its_part(tmp_path: Path) -> None:
    results = tmp_path / "res"
    grid = SweepGrid(workloads=("shift",), models=("jamba-1.5-mini",), budgets_bytes=(1 << 30,),
                     profiles=("h200",),  # Jamba's 96 GiB of weights need 141 GB
                     seeds=(0, 1), num_requests=(("shift", 9),))
    run_sweep(grid, results, workers=1, progress=False)
    (results / "runs.jsonl").write_text(json.dumps({
        "finished_utc": "2026-01-01T00:00:00+00:00", "argv": ["avmp", "bench"], "workers": 2,
        "num_cells": 8, "num_simulated": 8, "elapsed_s": 1.0, "cpu_count": 2,
        "machine": "Linux x86_64", "python": "3.11"}) + "\n")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Someone else's section\n\nkeep me\n")
    assert script.main([str(results), "--doc", str(doc)]) == 0
    first = doc.read_text()
    assert "keep me" in first and first.count(script.START) == 1
    assert "| shift | static | 2 |" in first and "8 of 8 cells simulated" in first
    # one cell per baseline, feasible on the H200 profile
    assert "| unified | 0 of 1 (0 with unlike work) | 0 of 0 (0 with unlike work) |" in first
    # like work, seed by seed: the lowest seed's ratio and its cell's mean
    static = next(line for line in first.splitlines() if line.startswith("| static |"))
    lowest, mean, rerun = (float(x) for x in re.findall(
        r"\| 0 of 1 \| ([\d.]+)x, cell ([\d.]+)x \(shift, jamba-1.5-mini, 1.0 GiB, h200\) "
        r"\| 0 of 1 \| ([\d.]+)x \(shift, jamba-1.5-mini, 1.0 GiB, h200\) \|$", static)[0])
    assert lowest <= mean
    assert rerun >= 0.99  # every layout completed the same requests: their own req/s
    assert "1.83x to 13.3x" in first
    doc.write_text(first + "\n## A later section\n\nalso kept\n")
    assert script.main([str(results), "--doc", str(doc)]) == 0
    second = doc.read_text()
    assert second.count(script.START) == 1 and "also kept" in second and "keep me" in second
    assert second.replace("\n## A later section\n\nalso kept\n", "") == first
    with_vllm = script.section(results, results)
    assert "ShareGPT with vLLM `bench serve` rules" in with_vllm
    assert f"python -m benchmarks.bench_section {results} --sharegpt-vllm {results}" in with_vllm


def test_sections_others_put_inside_the_markers_are_kept(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\n{script.START}\n## GPU backing\n\ntheirs 1\n\n{script.HEADING}\n\n"
                   f"old table\n\n## Later\n\ntheirs 2\n{script.END}\n\n## After\n")
    script.replace_section(doc, f"{script.START}\n{script.HEADING}\n\nnew table\n{script.END}\n")
    text = doc.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("theirs 1") < text.index(script.START) < text.index("new table")
    assert text.index(script.END) < text.index("theirs 2") < text.index("## After")
