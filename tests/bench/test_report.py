from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from bench_helpers import make_cell

from avmp.bench.report import headline_table, markdown_table, write_report
from avmp.sim.metrics import SloTargets


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


def _cell_with_requests(allocator: str, seed: int, finish: list[float]) -> dict:
    ids = list(range(len(finish)))
    columns = {"request_id": ids, "finish_s": finish, "ttft_s": [0.5] * len(ids),
               "tpot_s": [0.02] * len(ids)}
    return make_cell(allocator, seed=seed, request_throughput=len(ids) / max(finish),
                     makespan_s=max(finish), completed_requests=columns)


def test_headline_has_common_and_goodput_ratios_and_old_cells_read_n_a() -> None:
    new = [c for seed in range(2) for c in (_cell_with_requests("avmp", seed, [1.0, 2.0]),
                                            _cell_with_requests("unified", seed, [1.0, 4.0]))]
    headers, rows = headline_table(new, SloTargets(ttft_s=1.0, tpot_ms=50.0))
    assert headers[4:7] == ["requests all completed, req/s [95% CI]",
                            "same requests rerun, req/s [95% CI]", "goodput [95% CI]"]
    # both completed the same requests: the same-work figure is the cells' own req/s
    assert rows[0][4].startswith("2.00x") and rows[0][6].startswith("2.00x")
    assert rows[0][5] == rows[0][3]
    strict = headline_table(new, SloTargets(ttft_s=0.1))[1]
    assert strict[0][6] == "n/a (2 pairs zero)"  # nobody met a 0.1 s TTFT: zero goodput
    old = [make_cell("avmp", seed=9, request_throughput=2.0), make_cell("unified", seed=9)]
    mixed = headline_table(new + old)[1]
    assert mixed[0][2] == "3" and mixed[0][4].endswith("(1 pair n/a)")
    only_old = headline_table(old)[1]
    assert only_old[0][4:7] == ["n/a", "n/a", "n/a"] and only_old[0][3] == "2.00x"


def test_report_states_the_objectives_and_old_cells(tmp_path: Path) -> None:
    _write_cells(tmp_path)  # cells without per-request data, as saved before
    md_path, _ = write_report(tmp_path, SloTargets(ttft_s=3.0, tpot_ms=80.0))
    markdown = md_path.read_text()
    assert "goodput: requests/s that met TTFT <= 3 s and TPOT <= 80 ms" in markdown
    assert "18 cells saved without per-request data" in markdown
    assert "| shift | static | 3 | 2.10x [" in markdown and "| n/a | n/a |" in markdown


def _trace_cell(allocator: str, seed: int = 0, arrival: str | None = None,
                source: dict | None = None) -> dict:
    cell = make_cell(allocator, workload="chat", seed=seed)
    cell["settings"].update(trace_sha256="ab" * 32, arrival=arrival, num_requests=40)
    if source is not None:
        cell["trace"]["source"] = source
    return cell


def test_trace_lines_say_where_each_trace_came_from_and_how_it_was_timed() -> None:
    from avmp.bench.report import conditions, trace_lines

    here = {"file": "data/chat.jsonl", "format": "jsonl", "num_file_requests": 300}
    moved = {**here, "file": "elsewhere/chat.jsonl"}
    cells = [_trace_cell("avmp", source=here), _trace_cell("static", source=moved),
             _trace_cell("unified"), make_cell("avmp"), make_cell("static")]
    assert trace_lines(cells) == [
        "trace chat: 40 requests (the first 40 of 300) from data/chat.jsonl (jsonl); "
        "(the first 40 of 300) from elsewhere/chat.jsonl (jsonl), digest abababababab, "
        "replayed as recorded (seed 0)"]
    lines = conditions(cells)
    assert lines[lines.index("requests per trace: chat 40, uniform_short 10") + 1] \
        == trace_lines(cells)[0]
    assert not any("trace_sha256" in line for line in lines)
    timed = [_trace_cell(a, seed=s, arrival="poisson:2") for a in ("avmp", "static")
             for s in (0, 1)]
    assert trace_lines(timed) == ["trace chat: 40 requests, digest abababababab, replayed "
                                  "re-timed by poisson:2 per seed"]
    assert trace_lines([make_cell("avmp")]) == []
