"""Prefix caching as an axis of the sweep: cell keys that keep results saved without it,
pairs that never mix caches, the report's prefix table, and bad grids refused early."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from avmp.bench.report import headline_table, prefix_table, write_report
from avmp.bench.stats import coord, load_cells, paired_ratios
from avmp.bench.sweep import CellSpec, SweepGrid, run_sweep, trace_digest
from avmp.bench.workloads import make_prefix_workload, make_workload

GRID = SweepGrid(
    allocators=("avmp", "static"), workloads=("few_shot",), models=("granite-4.0-h-tiny",),
    budgets_bytes=(8 << 30,), profiles=("h200",), seeds=(0,),
    num_requests=(("few_shot", 24),), prefix_caches=("off", "avmp"),
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("prefix-sweep")
    run_sweep(GRID, directory, workers=1, progress=False)
    return directory


def test_a_cell_without_cache_keeps_its_old_id_and_coordinates() -> None:
    off = CellSpec("few_shot", "m", 1 << 30, "h200", 0, "avmp")
    assert off.cell_id == "few_shot__m__1p0GiB__h200__s0__avmp"
    assert "prefix_cache" not in off.to_dict()
    on = CellSpec("few_shot", "m", 1 << 30, "h200", 0, "avmp", "vllm-align")
    assert on.cell_id == "few_shot__m__1p0GiB__h200__s0__avmp__prefix-vllm-align"
    assert on.to_dict()["prefix_cache"] == "vllm-align"


def test_settings_do_not_name_the_cache() -> None:
    without = SweepGrid(**{**GRID.__dict__, "prefix_caches": ("off",)})
    assert without.settings_for("few_shot") == GRID.settings_for("few_shot")
    assert len(GRID.cells()) == 2 * len(without.cells())


def test_trace_digest_counts_segments_only_where_named() -> None:
    plain = make_workload("uniform_short", 0, 5)
    text = "\n".join(f"{r.request_id},{r.arrival_s!r},{r.prompt_tokens},{r.output_tokens}"
                     for r in plain)
    assert trace_digest(plain) == hashlib.sha256(text.encode()).hexdigest()
    shared = make_prefix_workload("few_shot", 0, 5)
    unshared = [type(r)(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
                for r in shared]
    assert trace_digest(shared) != trace_digest(unshared)


def test_cells_save_the_cache_only_when_on_and_pairs_never_mix(swept: Path) -> None:
    cells = load_cells(swept)
    by_cache = {coord(c, "prefix_cache"): c for c in cells if coord(c, "allocator") == "avmp"}
    assert sorted(by_cache) == ["avmp", "off"]
    saved = json.loads((swept / "cells" / f"{GRID.cells()[0].cell_id}.json").read_text())
    assert "prefix_cache" not in saved["cell"] and not saved["result"].get("prefix")
    on = by_cache["avmp"]["result"]
    assert on["prefix"]["policy"] == "avmp" and on["prefix"]["num_hit_tokens"] > 0
    assert on["ttft_p50_s"] < by_cache["off"]["result"]["ttft_p50_s"]
    rows = paired_ratios(cells, ("workload", "prefix_cache"))
    assert sorted((r.group["prefix_cache"], r.num_pairs) for r in rows) == [("avmp", 1),
                                                                           ("off", 1)]
    headers, body = headline_table(cells)
    assert headers[:3] == ["workload", "prefix cache", "baseline"]
    assert sorted(row[1] for row in body) == ["avmp", "off"]


def test_prefix_table_reads_hits_against_the_ideal_and_ttft_without_cache(swept: Path) -> None:
    cells = load_cells(swept)
    headers, rows = prefix_table(cells)
    assert [row[:4] for row in rows] == [["few_shot", "avmp", "avmp", "1"],
                                        ["few_shot", "avmp", "static", "1"]]
    avmp = next(c for c in cells if coord(c, "prefix_cache") == "avmp"
                and coord(c, "allocator") == "avmp")["result"]["prefix"]
    hit = headers.index("hit / ideal tokens")
    assert rows[0][hit].startswith(f"{avmp['num_hit_tokens']:,} / {avmp['num_ideal_tokens']:,}")
    off = next(c for c in cells if coord(c, "prefix_cache") == "off"
               and coord(c, "allocator") == "avmp")["result"]
    assert rows[0][headers.index("without cache")] == \
        f"{off['ttft_p50_s']:.3f} / {off['ttft_p99_s']:.3f}"
    md_path, _ = write_report(swept)
    text = md_path.read_text()
    assert "## Prefix caching" in text and "prefix caches: avmp, off" in text


def test_a_report_without_cache_has_no_prefix_column(tmp_path: Path) -> None:
    grid = SweepGrid(**{**GRID.__dict__, "prefix_caches": ("off",),
                        "num_requests": (("few_shot", 6),)})
    run_sweep(grid, tmp_path, workers=1, progress=False)
    headers, _ = headline_table(load_cells(tmp_path))
    assert headers[:2] == ["workload", "baseline"]
    assert "Prefix caching" not in write_report(tmp_path)[0].read_text()


@pytest.mark.parametrize(("fields", "message"), [
    ({"prefix_caches": ("lru",)}, "unknown prefix cache 'lru'"),
    ({"prefix_caches": ()}, "a sweep needs at least one of prefix caches"),
    ({"arrival": "poisson:2"}, "--arrival cannot re-time few_shot"),
    ({"models": ("nemotron-h-8b",), "budgets_bytes": (96 << 20,)},
     "--prefix-cache avmp on nemotron-h-8b, 96.0 MiB, avmp: prefix caching needs room for a "
     "checkpoint"),
])
def test_bad_grids_are_refused_before_any_work(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        SweepGrid(**{**GRID.__dict__, **fields})
