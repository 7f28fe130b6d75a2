"""benchmarks/tp.py: budgets sized per rank, cells that cannot fit an H200 skipped with
why, and a smoke run of every part end to end on the CPU (gloo, 1 and 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import tp


def test_budgets_shrink_with_ranks_and_the_47b_batch_256_needs_two_gpus() -> None:
    geometry = tp.full_geometry(tp.model_config(tp.BIG_MODEL, smoke=False))
    tokens = 1024 + 64
    budgets = [tp.cache_budget(geometry, n, 256, tokens) for n in (1, 2, 4)]
    assert budgets[0] > budgets[1] > budgets[2]
    assert all(b % tp.CHUNK == 0 for b in budgets)
    assert "per GPU" in (tp.fits_one_gpu(geometry, 1, budgets[0]) or "")
    assert tp.fits_one_gpu(geometry, 2, budgets[1]) is None
    assert tp.fits_one_gpu(geometry, 1, tp.cache_budget(geometry, 1, 64, tokens)) is None


def test_speedups_are_over_the_one_gpu_cell_of_the_same_batch() -> None:
    cells = [
        dict(size=1, batch=64, decode_tokens_per_s=100.0),
        dict(size=2, batch=64, decode_tokens_per_s=180.0),
        dict(size=1, batch=256, skipped="too big"),
        dict(size=2, batch=256, decode_tokens_per_s=400.0),
    ]
    assert tp.speedups(cells) == [
        dict(batch=64, size=1, speedup=1.0),
        dict(batch=64, size=2, speedup=1.8),
    ]


@pytest.mark.slow
def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tp.json"
    assert tp.main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    decode = result["decode"]
    assert [(c["size"], c["batch"]) for c in decode] == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert all(c["decode_tokens_per_s"] > 0 for c in decode)
    assert {(r["size"], r["batch"]) for r in result["scaling"]["speedups"]} == {
        (1, 2),
        (1, 4),
        (2, 2),
        (2, 4),
    }
    replay = result["replay"]
    assert [(r["size"], r["allocator"]) for r in replay] == [(2, "avmp"), (2, "static")]
    assert all(r["num_completed"] == r["num_requests"] == 8 for r in replay)
    assert "| nemotron-h-8b | 2 | avmp | 8 of 8 |" in printed
    assert tp.main(["--markdown", str(out)]) == 0
    assert "**decode**" in capsys.readouterr().out
