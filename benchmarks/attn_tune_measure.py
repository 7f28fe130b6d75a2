"""What `benchmarks.attn_tune` runs on the GPU: the geometries, the candidates and their
pruning, the runs that check and time them, the sweep, and the tuned table it writes. It
imports Triton; `benchmarks.attn_tune` imports it only to sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

from avmp.kernels.triton._common import dtype_name
from avmp.kernels.triton.prefill_attention import (
    TUNED_TABLE,
    AttentionTiles,
    attention_tiles,
    parse_tuned_table,
    prefill_attention,
    query_block,
)
from avmp.models.hf import geometry_from_config
from avmp.models.zoo import zoo_config
from benchmarks import tuning
from benchmarks.common import Timer, rel_error
from benchmarks.tuning import Rig, pick_fastest

# (prompts, new tokens each, cached tokens each)
STEPS = ((1, 8192, 0), (1, 8192, 24576), (8, 1024, 0))
PAGE = 16
DTYPE = torch.bfloat16
PEAK_TFLOPS = 989.0  # bf16 dense tensor-core peak of an H100 / H200 SXM
# Candidates whose outputs differ more than this from the default tiles' are rejected: the
# same products summed in another order differ by about the bf16 output's rounding
# (~4e-3 per element), a wrong tiling by O(1).
MATCH_TOLERANCE = 1e-2
SWEEP_TIMING = {"warmup": 3, "repeats": 7}
FINAL_TIMING = {"warmup": 10, "repeats": 25}
TIMING = (f"CUDA events around each call, median of {FINAL_TIMING['repeats']} after "
          f"{FINAL_TIMING['warmup']} warm-up calls (the sweep: median of "
          f"{SWEEP_TIMING['repeats']} after {SWEEP_TIMING['warmup']})")


@dataclass(frozen=True)
class Geometry:
    """An attention layer as the kernel sees it."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Grid:
    """The candidate values the sweep draws from."""

    block_m: tuple[int, ...] = (64, 128)
    block_n: tuple[int, ...] = (32, 64, 128)
    warps: tuple[int, ...] = (4, 8)
    stages: tuple[int, ...] = (1, 2, 3, 4)
    phase_one_stages: int = 2


# The --smoke run: a geometry and steps the interpreter runs in seconds, a grid of four.
SMOKE_GEOMETRY = Geometry(4, 2, 32)
SMOKE_STEPS = ((1, 24, 0), (1, 20, 40), (2, 12, 0))
SMOKE_GRID = Grid(block_m=(16, 32), block_n=(16, 32), warps=(4,), stages=(2,))


@dataclass(frozen=True)
class Trial:
    """One candidate: its time per step (None when it did not run) and relative score,
    or why it was dropped (``error``: pruned, failed to compile or launch, a mismatch)."""

    tiles: AttentionTiles
    ms: tuple[float, ...] | None = None
    score: float | None = None
    rel_error: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None

    @property
    def cost(self) -> float:
        """What `pick_fastest` ranks by: the score."""
        return self.score if self.score is not None else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"tiles": self.tiles.to_dict(), "label": self.tiles.label(),
                "ms": None if self.ms is None else list(self.ms), "score": self.score,
                "rel_error": self.rel_error, "error": self.error}


# -- geometry and FLOPs (pure) ----------------------------------------------------------------


def attention_geometry(model: str) -> Geometry:
    """The attention layers of a zoo model: query heads from its config, KV heads and
    head_dim as `geometry_from_config` reads them.

    Raises:
        ValueError: the model has no attention layer, or no ``num_attention_heads``.
    """
    cfg = zoo_config(model)
    layers = geometry_from_config(cfg).attention_layers
    heads = cfg.get("num_attention_heads")
    if not layers or not isinstance(heads, int):
        raise ValueError(f"{model}: no attention layers with num_attention_heads to tune")
    return Geometry(heads, layers[0].num_kv_heads, layers[0].head_dim)


def causal_pairs(batch: int, new: int, cached: int) -> int:
    """(query, key) pairs a causal step computes: each new token sees the cache and the
    new tokens up to itself."""
    return batch * (new * cached + new * (new + 1) // 2)


def causal_flops(geo: Geometry, batch: int, new: int, cached: int) -> int:
    """Two matrix products (scores, then values) of 2 FLOPs per multiply-add."""
    return 4 * geo.heads * geo.head_dim * causal_pairs(batch, new, cached)


def tflops(flops: int, ms: float) -> float:
    return flops / ms / 1e9


def step_label(step: tuple[int, int, int]) -> str:
    batch, new, cached = step
    return f"{batch} x {new}" + (f" after {cached}" if cached else "")


# -- candidates (pure) ------------------------------------------------------------------------


def phase_one(grid: Grid) -> list[AttentionTiles]:
    """Tile sizes x warps at the grid's phase-one stages, the defaults first (timed
    even when off the grid)."""
    combos = itertools.product(grid.block_m, grid.block_n, grid.warps)
    candidates = [AttentionTiles(), *(AttentionTiles(block_m=m, block_n=n, num_warps=w,
                                                     num_stages=grid.phase_one_stages)
                                      for m, n, w in combos)]
    return list(dict.fromkeys(candidates))


def phase_two(best: AttentionTiles, grid: Grid) -> list[AttentionTiles]:
    """Warps x stages around phase 1's fastest, itself left out (already timed)."""
    variants = (dataclasses.replace(best, num_warps=w, num_stages=s)
                for w in grid.warps for s in grid.stages)
    return [v for v in dict.fromkeys(variants) if v != best]


def smem_lower_bound(tiles: AttentionTiles, geo: Geometry, itemsize: int = 2) -> int:
    """The fewest bytes of shared memory the launch takes: the pipeline keeps
    ``num_stages - 1`` K and V tiles in flight (one without pipelining), beside the
    query tile. Above the GPU's limit it cannot run."""
    d = triton.next_power_of_2(geo.head_dim)
    kv = 2 * tiles.block_n * d * itemsize
    return tiles.block_m * d * itemsize + max(1, tiles.num_stages - 1) * kv


# -- running candidates ------------------------------------------------------------------------


class StepCase:
    """One step's inputs on the device, the default tiles' output, and the runs."""

    def __init__(self, geo: Geometry, step: tuple[int, int, int], device: torch.device,
                 gen: torch.Generator) -> None:
        batch, new, cached = step
        self.label, self.flops = step_label(step), causal_flops(geo, batch, new, cached)
        self.group = geo.group
        pages_each = -(-(cached + new) // PAGE)
        num_pages = batch * pages_each
        pool = torch.randn(num_pages, 2, PAGE, geo.kv_heads, geo.head_dim, generator=gen,
                           device=device).to(DTYPE)  # K and V of a page side by side
        self.k, self.v = pool[:, 0], pool[:, 1]
        order = torch.randperm(num_pages, generator=gen, device=device)
        self.bt = order.int().view(batch, pages_each)
        self.q = torch.randn(batch * new, geo.heads, geo.head_dim, generator=gen,
                             device=device).to(DTYPE)
        self.qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=device)
        self.ctx = torch.full((batch,), cached + new, dtype=torch.int32, device=device)
        self.new, self.scale = new, geo.head_dim**-0.5
        self.out = torch.empty_like(self.q)
        self._tables: dict[int, Any] = {}
        self.reference = self.run(AttentionTiles()).clone()

    def run(self, tiles: AttentionTiles) -> torch.Tensor:
        """One launch as the engine makes it: through the tile table of its query block."""
        block = query_block(tiles, self.group)
        if block not in self._tables:
            self._tables[block] = attention_tiles(self.qsl, self.q.shape[0], block)
        return prefill_attention(self.q, self.k, self.v, self.bt, self.qsl, self.ctx,
                                 self.scale, self.new, out=self.out, tiles=self._tables[block],
                                 config=tiles)  # fmt: skip

    def mismatch(self, tiles: AttentionTiles) -> float:
        return rel_error(self.run(tiles), self.reference)


def try_candidate(tiles: AttentionTiles, cases: Sequence[StepCase], timer: Timer,
                  baseline: Sequence[float], geo: Geometry, smem_limit: int) -> Trial:
    """Check, then time, one candidate on every step; never raises for a candidate that
    cannot compile, cannot launch or gives another result."""
    need = smem_lower_bound(tiles, geo)
    if need > smem_limit:
        return Trial(tiles, error=f"pruned: needs >= {need} B of shared memory, "
                                  f"the GPU has {smem_limit}")
    times, worst = [], 0.0
    try:
        for case in cases:
            err = case.mismatch(tiles)
            worst = max(worst, err)
            if not err <= MATCH_TOLERANCE:  # NaN too
                return Trial(tiles, rel_error=err,
                             error=f"mismatch on {case.label}: rel error {err:.2e}")
            times.append(timer(lambda c=case: c.run(tiles)))
    except Exception as error:  # a compile or launch failure: record it, go on
        return Trial(tiles, error=tuning.one_line(error))
    score = statistics.fmean(t / b for t, b in zip(times, baseline, strict=True))
    return Trial(tiles, ms=tuple(times), score=score, rel_error=worst)


def sweep(grid: Grid, attempt: Callable[[AttentionTiles], Trial],
          out_of_time: Callable[[], bool]) -> tuple[list[Trial], int]:
    """Both phases; returns the trials and how many candidates the budget left untried
    (the defaults always run: they are the baseline)."""
    return tuning.sweep_phases(phase_one(grid), lambda best: phase_two(best, grid), attempt,
                               out_of_time)


@dataclass(frozen=True)
class Setup:
    """How the sweep runs: where and timed how (`Rig`), on which steps and grid, and
    for how long."""

    rig: Rig
    steps: tuple[tuple[int, int, int], ...]
    budget_s: float
    grid: Grid = Grid()


def step_report(case: StepCase, default_ms: float, tuned_ms: float, err: float) -> dict[str, Any]:
    before, after = tflops(case.flops, default_ms), tflops(case.flops, tuned_ms)
    return {"step": case.label, "flops": case.flops, "default_ms": default_ms,
            "tuned_ms": tuned_ms, "default_tflops": before, "tuned_tflops": after,
            "default_peak_share": before / PEAK_TFLOPS, "tuned_peak_share": after / PEAK_TFLOPS,
            "speedup": default_ms / tuned_ms, "rel_error": err}


def sweep_geometry(model: str, geo: Geometry, setup: Setup, deadline: float,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """One geometry: the sweep, then the defaults against the tuned tiles."""
    device = setup.rig.device
    gen = torch.Generator(device=device).manual_seed(0)
    cases = [StepCase(geo, step, device, gen) for step in setup.steps]
    sweep_timer, final_timer = setup.rig.timers
    default = AttentionTiles()
    baseline = [sweep_timer(lambda c=c: c.run(default)) for c in cases]

    def attempt(tiles: AttentionTiles) -> Trial:
        trial = try_candidate(tiles, cases, sweep_timer, baseline, geo, setup.rig.smem_limit)
        progress(f"{model} {tiles.label()}: " + (f"score {trial.score:.3f}" if trial.ok
                                                  else str(trial.error)))
        return trial

    trials, skipped = sweep(setup.grid, attempt, tuning.out_of_time(deadline))
    best = pick_fastest(trials)
    tuned = best.tiles if best else default
    steps = []
    for case in cases:
        err = case.mismatch(tuned)
        default_ms = final_timer(lambda c=case: c.run(default))
        tuned_ms = final_timer(lambda c=case: c.run(tuned))
        steps.append(step_report(case, default_ms, tuned_ms, err))
    return {"model": model, "geometry": dataclasses.asdict(geo), "group": geo.group,
            "dtype": dtype_name(DTYPE), "page": PAGE, "default": default.to_dict(),
            "tuned": tuned.to_dict(), "tuned_label": tuned.label(),
            "default_label": default.label(), "trials": [t.to_dict() for t in trials],
            "skipped": skipped, "steps": steps}


def run(targets: Sequence[tuple[str, Geometry]], setup: Setup, argv: Sequence[str]
        ) -> dict[str, Any]:
    """The sweep over every geometry, one line per candidate on stderr."""
    start = time.perf_counter()
    results = []
    for index, (model, geo) in enumerate(targets):
        deadline = tuning.deadline(start, setup.budget_s, index, len(targets))
        results.append(sweep_geometry(model, geo, setup, deadline,
                                      lambda line: print(line, file=sys.stderr, flush=True)))
    return tuning.sweep_result("attn_tune", setup, argv, MATCH_TOLERANCE, start, results,
                               {"peak_tflops": PEAK_TFLOPS})


# -- the tuned table ---------------------------------------------------------------------------


ABOUT = ("Launch tiles of the prefill attention kernel per GPU name and (head_dim, GQA group, "
         "dtype), written by benchmarks/attn_tune.py; a GPU or shape not listed gets the "
         "defaults.")
TABLE = tuning.TunedTableFile(TUNED_TABLE, ABOUT, ("head_dim", "group", "dtype"), "steps",
                              parse_tuned_table)


# -- from the command line -------------------------------------------------------------------


def setup_for(args: argparse.Namespace) -> tuple[list[tuple[str, Geometry]], Setup]:
    """What to sweep and how, from the arguments.

    Raises:
        ValueError: an unknown model, a budget <= 0, no CUDA GPU (or, with ``--smoke``,
            not under Triton's interpreter).
    """
    if not args.budget_s > 0:
        raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.smoke:
        return [("smoke", SMOKE_GEOMETRY)], Setup(tuning.smoke_rig(), SMOKE_STEPS,
                                                  args.budget_s, SMOKE_GRID)
    targets = [(model, attention_geometry(model)) for model in args.models]
    rig = tuning.gpu_rig(SWEEP_TIMING, FINAL_TIMING, TIMING)
    return targets, Setup(rig, STEPS, args.budget_s)


def sweep_steps(args: argparse.Namespace, argv: Sequence[str]) -> tuning.SweepSteps:
    """The sweep's steps of `tuning.tuner_main`, for these arguments."""
    return tuning.SweepSteps(lambda: setup_for(args), lambda t, s: run(t, s, argv), TABLE.write)
