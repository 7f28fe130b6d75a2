from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from bench_helpers import make_cell

from avmp.bench.report import headline_table, markdown_table, write_report


def _timeline(state_fraction: float, budget: int) -> list[dict]:
    return [{"t_s": float(t), "kv_capacity_bytes": int(budget * (1 - state_fraction)),
             "state_capacity_bytes": int(budget * state_fraction), "kv_used_bytes": 10 * t,
             "state_used_bytes": 5 * t, "num_running": 1, "num_waiting": 0} for t in range(5)]


def _write_cells(directory: Path) -> None:
    (directory / "cells").mkdir(parents=True)
    budget = 1 << 30
    cells = []
    for seed in range(3):
        for workload in ("uniform_short", "shift"):
            for allocator, thr in (("avmp", 2.0 + 0.1 * seed), ("static", 1.0), ("unified", 1.5)):
                cells.append(make_cell(allocator, workload=workload, seed=seed,
                                       request_throughput=thr, budget_bytes=budget,
                                       timeline=_timeline(0.3 if allocator == "avmp" else 0.47,
                                                          budget)))
    for i, cell in enumerate(cells):
        (directory / "cells" / f"{i:03d}.json").write_text(json.dumps(cell))


def test_report_files_are_written_from_saved_cells(tmp_path: Path) -> None:
    _write_cells(tmp_path)
    md_path, html_path = write_report(tmp_path)
    markdown = md_path.read_text()
    assert "| shift | static | 3 | 2.10x [" in markdown
    assert "statistic: geometric mean of per-pair ratios" in markdown
    for name in ("ratios", "shift_split", "phases"):
        assert f"(figures/{name}.png)" in markdown
        assert (tmp_path / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    page = html_path.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "figures/" not in page  # self-contained: no file references


def test_same_cells_same_report(tmp_path: Path) -> None:
    _write_cells(tmp_path)
    first = [p.read_bytes() for p in write_report(tmp_path)]
    second = [p.read_bytes() for p in write_report(tmp_path)]
    assert first == second


def test_headline_orders_baselines(tmp_path: Path) -> None:
    _write_cells(tmp_path)
    from avmp.bench.stats import load_cells

    table = headline_table(load_cells(tmp_path))
    assert [row[:2] for row in table[1]] == [["shift", "unified"], ["shift", "static"],
                                             ["uniform_short", "unified"],
                                             ["uniform_short", "static"]]
    assert markdown_table(table).count("\n") == 5
