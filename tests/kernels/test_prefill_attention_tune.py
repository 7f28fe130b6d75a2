"""benchmarks/attn_tune.py and its sweep (attn_tune_measure.py) off the GPU: the geometries
it reads from the zoo, the causal pairs and FLOPs it reports, its candidate grid, pruning,
checking and picking (with fake steps and a fake timer), the tuned table it writes and the
kernel reads, its refusal without CUDA; and its --smoke sweep of the real code path under
Triton's interpreter (wall-clock times, tiny shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from triton_device import kernel_device

DEVICE = kernel_device()

from avmp.kernels.triton.prefill_attention import (  # noqa: E402
    AttentionTiles,
    packaged_tuned_table,
    parse_tuned_table,
    tuned_attention_tiles,
)
from benchmarks import attn_tune, attn_tune_measure  # noqa: E402
from benchmarks.attn_tune_measure import Geometry, Grid, Trial  # noqa: E402
from benchmarks.common import read_result  # noqa: E402

NEMOTRON = Geometry(32, 8, 128)


def test_geometries_come_from_the_zoo() -> None:
    assert attn_tune_measure.attention_geometry("granite-4.0-h-micro") == Geometry(32, 8, 64)
    assert attn_tune_measure.attention_geometry("nemotron-h-8b") == NEMOTRON
    assert NEMOTRON.group == 4


@pytest.mark.parametrize("batch,new,cached", [(1, 7, 0), (2, 5, 9), (3, 1, 4)])
def test_causal_pairs_count_every_visible_key(batch: int, new: int, cached: int) -> None:
    query_pos = torch.arange(cached, cached + new)
    visible = torch.arange(cached + new)[None, :] <= query_pos[:, None]
    assert attn_tune_measure.causal_pairs(batch, new, cached) == batch * int(visible.sum())
    geo = Geometry(4, 2, 16)
    assert attn_tune_measure.causal_flops(geo, batch, new, cached) == (
        4 * 4 * 16 * attn_tune_measure.causal_pairs(batch, new, cached))


def test_the_grid_starts_with_the_defaults_and_phase_two_varies_warps_and_stages() -> None:
    grid = Grid()
    first = attn_tune_measure.phase_one(grid)
    assert first[0] == AttentionTiles()
    assert len(first) == 1 + 2 * 3 * 2 and len(set(first)) == len(first)
    best = AttentionTiles(block_m=128, block_n=64, num_warps=8, num_stages=2)
    second = attn_tune_measure.phase_two(best, grid)
    assert best not in second and len(second) == 2 * 4 - 1
    assert {(t.block_m, t.block_n) for t in second} == {(128, 64)}


def test_tiles_that_cannot_fit_in_shared_memory_are_pruned() -> None:
    fits = AttentionTiles(block_m=128, block_n=128, num_warps=8, num_stages=4)
    assert (attn_tune_measure.smem_lower_bound(fits, NEMOTRON)
            == 128 * 128 * 2 + 3 * 2 * 128 * 128 * 2)
    big = AttentionTiles(block_m=128, block_n=128, num_warps=8, num_stages=5)
    trial = attn_tune_measure.try_candidate(big, [], lambda fn: 1.0, [], NEMOTRON, 227 * 1024)
    assert trial.error is not None and trial.error.startswith("pruned") and not trial.ok


class FakeCase:
    """A step whose runs give a fixed error and whose timer reads a fixed time."""

    def __init__(self, label: str, err: float, fails: bool = False) -> None:
        self.label, self.err, self.fails = label, err, fails

    def mismatch(self, tiles: AttentionTiles) -> float:
        if self.fails:
            raise RuntimeError("out of resources\nshared memory: 300000 > 232448")
        return self.err

    def run(self, tiles: AttentionTiles) -> float:
        return float(tiles.block_m)


def timer(fn: object) -> float:
    return fn()  # type: ignore[operator,no-any-return]


def test_candidates_are_checked_then_scored_against_the_defaults() -> None:
    tiles = AttentionTiles(block_m=128)
    ok = attn_tune_measure.try_candidate(tiles, [FakeCase("a", 1e-3), FakeCase("b", 0.0)], timer,
                                         [64.0, 256.0], NEMOTRON, 1 << 30)  # fmt: skip
    assert ok.ok and ok.ms == (128.0, 128.0) and ok.score == pytest.approx((2 + 0.5) / 2)
    bad = attn_tune_measure.try_candidate(tiles, [FakeCase("a", 0.5)], timer, [1.0], NEMOTRON,
                                          1 << 30)
    assert not bad.ok and bad.error == "mismatch on a: rel error 5.00e-01"
    nan = attn_tune_measure.try_candidate(tiles, [FakeCase("a", float("nan"))], timer, [1.0],
                                          NEMOTRON, 1 << 30)  # fmt: skip
    assert not nan.ok
    failed = attn_tune_measure.try_candidate(tiles, [FakeCase("a", 0.0, fails=True)], timer, [1.0],
                                             NEMOTRON, 1 << 30)  # fmt: skip
    assert failed.error == "RuntimeError: shared memory: 300000 > 232448"


def test_the_lowest_score_wins_and_the_budget_skips_what_is_left() -> None:
    trials = [Trial(AttentionTiles(), score=1.0), Trial(AttentionTiles(block_n=64), score=0.7),
              Trial(AttentionTiles(block_n=128), error="pruned")]
    best = attn_tune_measure.pick_fastest(trials)
    assert best is not None and best.tiles.block_n == 64
    assert attn_tune_measure.pick_fastest(trials[2:]) is None
    tried: list[AttentionTiles] = []

    def attempt(tiles: AttentionTiles) -> Trial:
        tried.append(tiles)
        return Trial(tiles, score=1.0)

    done, skipped = attn_tune_measure.sweep(Grid(), attempt, lambda: True)
    assert tried == [AttentionTiles()] and len(done) == 1  # the baseline always runs
    assert skipped == len(attn_tune_measure.phase_one(Grid())) - 1 + 2 * 4 - 1


def fake_result(device: str, tiles: AttentionTiles, head_dim: int = 128) -> dict[str, object]:
    return {"device": device, "command": "attn_tune --out x", "geometries": [
        {"model": "nemotron-h-8b", "geometry": {"heads": 32, "kv_heads": 8, "head_dim": head_dim},
         "group": 4, "dtype": "bfloat16", "tuned": tiles.to_dict(),
         "steps": [{"step": "1 x 8192", "speedup": 1.5}]}]}


def test_the_written_table_is_what_the_kernel_reads() -> None:
    tuned = AttentionTiles(block_m=128, block_n=64, num_warps=8, num_stages=3)
    old = attn_tune_measure.TABLE.entries(fake_result("NVIDIA H100 80GB HBM3", AttentionTiles()))
    keep = attn_tune_measure.TABLE.entries(fake_result("NVIDIA H200", AttentionTiles(),
                                                       head_dim=64))
    new = attn_tune_measure.TABLE.entries(fake_result("NVIDIA  H100 80GB HBM3", tuned))
    table = attn_tune_measure.TABLE.merged(old + keep, new)
    assert len(table["entries"]) == 2 and table["entries"][-1]["tiles"] == tuned.to_dict()
    parsed = parse_tuned_table(json.loads(json.dumps(table)), "t")
    assert tuned_attention_tiles(128, 4, torch.bfloat16, "nvidia h100 80gb hbm3", parsed) == tuned
    assert tuned_attention_tiles(128, 4, "float32", "NVIDIA H100 80GB HBM3", parsed) == (
        AttentionTiles())
    assert tuned_attention_tiles(128, 4, torch.bfloat16, None, parsed) == AttentionTiles()
    with pytest.raises(ValueError, match="a second entry"):
        attn_tune_measure.TABLE.merged([], new + new)


def test_the_packaged_table_is_valid() -> None:
    """The shipped table (none until a GPU run writes one) parses (a malformed one
    raises), and its entries name dtypes the kernel takes."""
    for key in packaged_tuned_table():
        assert key.dtype in ("bfloat16", "float16", "float32"), key


@pytest.mark.parametrize("entry,message", [
    ({"gpu": "g", "command": "c", "dtype": "bfloat16", "head_dim": 0, "group": 4},
     "'head_dim' must be a positive int"),
    ({"gpu": "g", "command": "c", "dtype": "bfloat16", "head_dim": 64, "group": 4,
      "tiles": {"block_m": 48}}, "block_m must be a power of two"),
    ({"gpu": "g", "command": "c", "dtype": "bfloat16", "head_dim": 64, "group": 4,
      "tiles": {"block_k": 64}}, "unexpected keyword argument 'block_k'"),
])  # fmt: skip
def test_a_malformed_table_is_refused(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tuned_table({"entries": [entry]}, "t")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_so_in_one_line(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    assert attn_tune.main(["--out", str(tmp_path / "r.json.gz")]) == 2
    assert capsys.readouterr().err == "attn_tune: needs a CUDA GPU (none is visible)\n"
    assert attn_tune.main(["--out", str(tmp_path / "r.json.gz"), "--budget-s", "0"]) == 2
    assert "--budget-s must be > 0" in capsys.readouterr().err


@pytest.mark.skipif(DEVICE.type == "cuda", reason="--smoke runs under the interpreter")
def test_the_smoke_sweep_runs_the_real_code_path(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    out, table = tmp_path / "smoke.json.gz", tmp_path / "prefill_attention.json"
    assert attn_tune.main(["--smoke", "--out", str(out), "--write-table", str(table)]) == 0
    result = read_result(out)
    (geometry,) = result["geometries"]
    assert [s["step"] for s in geometry["steps"]] == ["1 x 24", "1 x 20 after 40", "2 x 12"]
    assert all(t["error"] is None for t in geometry["trials"])  # every candidate matched
    assert all(s["rel_error"] <= attn_tune_measure.MATCH_TOLERANCE for s in geometry["steps"])
    assert geometry["steps"][1]["flops"] == 4 * 4 * 32 * (20 * 40 + 20 * 21 // 2)
    parsed = parse_tuned_table(json.loads(table.read_text()), "written")
    tuned = AttentionTiles.from_dict(geometry["tuned"])
    assert tuned_attention_tiles(32, 2, "bfloat16", "cpu", parsed) == tuned
    assert "| smoke (4/2 heads, D=32) | 1 x 20 after 40 |" in capsys.readouterr().out
