"""What `benchmarks.scan_tune` runs on the GPU: the geometries, the candidates and their
pruning, the runs that check and time them, the sweep, and the tuned table it writes. It
imports Triton; `benchmarks.scan_tune` imports it only to sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

from avmp.kernels.triton.mamba2_chunk_scan import (
    KERNEL_TILES,
    SCAN_KERNELS,
    TUNED_TABLE,
    KernelTiles,
    ScanTiles,
    StatePassingTiles,
    chunk_layout,
    chunk_scan_launches,
    dtype_name,
    mamba2_chunk_scan,
    parse_tuned_table,
    tuned_tiles,
)
from avmp.models.dtypes import default_ssm_dtype
from avmp.models.zoo import zoo_config
from benchmarks import tuning
from benchmarks.common import Timer, rel_error
from benchmarks.kernels_measure import ScanGeometry
from benchmarks.tuning import Rig, pick_fastest

# The kernels with no loop that Triton software-pipelines: num_stages changes nothing.
UNPIPELINED = ("dt_cumsum", "state_passing")
DTYPE = torch.bfloat16
# Candidates whose outputs differ more than this from the default tiles' are rejected: the
# same products summed in another order differ by the bf16 output's rounding (~4e-3 per
# element), a wrong tiling by O(1).
MATCH_TOLERANCE = 1e-2
SWEEP_TIMING = {"warmup": 4, "repeats": 10}
FINAL_TIMING = {"warmup": 12, "repeats": 30}
# The dt cumsum and the state passing take microseconds, less than their launch from Python:
# timed back-to-back, the calls after the first hide that cost, as they do in a step.
CALLS_PER_EVENT = 4
TIMING = (f"CUDA events around {CALLS_PER_EVENT} back-to-back calls, median of "
          f"{FINAL_TIMING['repeats']} after {FINAL_TIMING['warmup']} warm-up calls "
          f"(the sweep: median of {SWEEP_TIMING['repeats']})")
# Zoo keys of the Mamba2 mixer per model_type: chunk size, heads, head_dim, d_state, groups.
MIXER_KEYS = {
    "granitemoehybrid": ("mamba_chunk_size", "mamba_n_heads", "mamba_d_head", "mamba_d_state",
                         "mamba_n_groups"),
    "nemotron_h": ("chunk_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                   "n_groups"),
}  # fmt: skip


@dataclass(frozen=True)
class Grid:
    """The candidate values the sweep draws from (a tile size is kept where it divides
    the dimension it tiles and is no larger)."""

    tile_sizes: tuple[int, ...] = (32, 64, 128)
    head_blocks: tuple[int, ...] = (4, 8, 16)
    flat_blocks: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    prefetch: tuple[int, ...] = StatePassingTiles.PREFETCH
    warps: tuple[int, ...] = (4, 8)
    passing_warps: tuple[int, ...] = (2, 4, 8)  # the state passing's: no matrix product
    stages: tuple[int, ...] = (1, 2, 3)


# The --smoke run: a shape the interpreter runs in seconds, with sequences of 1 to 5 chunks.
SMOKE_GEOMETRY = ScanGeometry(heads=4, head_dim=32, d_state=32, groups=2, chunk_size=16)
SMOKE_STEPS = ((1, 80), (2, 24))
SMOKE_GRID = Grid(tile_sizes=(16,), head_blocks=(4,), flat_blocks=(256, 1024), warps=(4,),
                  passing_warps=(2, 4), stages=(1,))


@dataclass(frozen=True)
class Trial:
    """One candidate of one kernel: its time per step (None when it did not run) or why
    it was dropped (``error``: pruned, failed to compile or launch, or a mismatch)."""

    kernel: str
    tiles: KernelTiles
    ms: tuple[float, ...] | None = None
    rel_error: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None

    @property
    def total_ms(self) -> float:
        return sum(self.ms) if self.ms is not None else float("inf")

    @property
    def cost(self) -> float:
        """What `pick_fastest` ranks by: the time over all steps."""
        return self.total_ms

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "tiles": dataclasses.asdict(self.tiles),
                "label": self.tiles.label(), "ms": None if self.ms is None else list(self.ms),
                "rel_error": self.rel_error, "error": self.error}


# -- geometries --------------------------------------------------------------------------


def scan_geometry(model: str) -> ScanGeometry:
    """The Mamba2 mixer of a zoo model, as the scan sees it.

    Raises:
        ValueError: the model has no Mamba2 mixer this script knows the keys of.
    """
    cfg = zoo_config(model)
    keys = MIXER_KEYS.get(cfg.get("model_type", ""))
    if keys is None:
        raise ValueError(f"{model}: no Mamba2 mixer keys known for model_type "
                         f"{cfg.get('model_type')!r} (known: {', '.join(MIXER_KEYS)})")
    chunk, heads, head_dim, d_state, groups = (int(cfg[k]) for k in keys)
    return ScanGeometry(heads, head_dim, d_state, groups, chunk)


# -- candidates (pure) -----------------------------------------------------------------------


def fitting(size: int, choices: Sequence[int]) -> tuple[int, ...]:
    """The choices that divide ``size`` and are no larger than it."""
    return tuple(c for c in choices if c <= size and size % c == 0)


def tile_axes(kernel: str, geo: ScanGeometry, grid: Grid) -> dict[str, tuple[int, ...]]:
    """Phase 1's values of each tile size of ``kernel`` (and the state passing's prefetch
    depth): an empty axis (a dimension below every choice) keeps the default, which the
    launch shrinks to the dimension."""
    dims = {"block_tokens": geo.chunk_size, "block_p": geo.head_dim, "block_state": geo.d_state,
            "block_j": geo.chunk_size}
    default = KERNEL_TILES[kernel]()
    axes = {}
    for name in default.BLOCK_RANGES:
        if name == "block_heads":
            values = tuple(b for b in grid.head_blocks if b <= geo.heads)
        elif name == "block_flat":
            values = fitting(geo.head_dim * geo.d_state, grid.flat_blocks)
        else:
            values = fitting(dims[name], grid.tile_sizes)
        axes[name] = values or (getattr(default, name),)
    if kernel == "state_passing":
        axes["prefetch"] = grid.prefetch
    return axes


def phase_one(kernel: str, geo: ScanGeometry, grid: Grid,
              shipped: KernelTiles | None = None) -> list[KernelTiles]:
    """Every combination of ``kernel``'s tile sizes at the default warps and stages, the
    default configuration first (so that it is timed even when its sizes are off-grid),
    then the ``shipped`` tiles (the packaged table's for this GPU, when it has them)."""
    default = KERNEL_TILES[kernel]()
    axes = tile_axes(kernel, geo, grid)
    combos = (dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values()))
    candidates = [default, *([shipped] if shipped is not None else []),
                  *(dataclasses.replace(default, **combo) for combo in combos)]
    return list(dict.fromkeys(candidates))


def phase_two(kernel: str, best: KernelTiles, grid: Grid) -> list[KernelTiles]:
    """Warps x stages around phase 1's fastest tiles, itself left out (already timed).
    The dt cumsum has no loop to pipeline, the state passing none that Triton pipelines
    (its code is the same at 1 and 3 stages): only their warps vary."""
    warps = grid.passing_warps if kernel == "state_passing" else grid.warps
    stages = (best.num_stages,) if kernel in UNPIPELINED else grid.stages
    variants = (dataclasses.replace(best, num_warps=w, num_stages=s)
                for w in warps for s in stages)
    return [v for v in dict.fromkeys(variants) if v != best]


def _shrunk(tile: int, size: int) -> int:
    """The tile a launch uses for a dimension of ``size``: as `mamba2_chunk_scan` shrinks
    it (the next power of two >= 16, capped by ``tile``)."""
    return min(max(triton.next_power_of_2(size), 16), tile)


def smem_lower_bound(kernel: str, tiles: KernelTiles, geo: ScanGeometry) -> int:
    """The fewest bytes of shared memory the kernel's staged dot operands take (bf16
    activations and chunk entries, fp32 CB), at least ``num_stages - 1`` copies of its
    largest loop's: above the GPU's limit it cannot run. 0 for the kernels without
    matrix products."""
    t = dataclasses.asdict(tiles)
    tok = _shrunk(t.get("block_tokens", 0), geo.chunk_size)
    p = _shrunk(t.get("block_p", 0), geo.head_dim)
    n = _shrunk(t.get("block_state", 0), geo.d_state)
    j = _shrunk(t.get("block_j", 0), geo.chunk_size)
    if kernel == "cb":
        per_stage = 2 * tok * n * 2
    elif kernel == "chunk_state":
        per_stage = (p * tok + tok * n) * 2
    elif kernel == "chunk_scan":
        per_stage = max(tok * n * 2 + n * p * 2, tok * j * 4 + j * p * 2)
    else:
        return 0
    return max(1, tiles.num_stages - 1) * per_stage


# -- running candidates ------------------------------------------------------------------------


class StepCase:
    """One step's scan inputs on the device, the default configuration's outputs, and
    the runs the sweep makes of them."""

    def __init__(self, geo: ScanGeometry, batch: int, tokens_each: int, state_dtype: torch.dtype,
                 device: torch.device, gen: torch.Generator) -> None:
        self.label = f"{batch} x {tokens_each}"
        tokens = batch * tokens_each

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device)

        # a slot-major pool: each request's state is a strided view, as AVMP lays it out
        pool = (rand(batch, 3, geo.heads, geo.head_dim, geo.d_state) * 0.1).to(state_dtype)
        self.state = pool[:, 1]
        self.saved = self.state.clone()
        self.slots = torch.arange(batch, dtype=torch.int32, device=device)
        self.qsl = torch.arange(0, tokens + 1, tokens_each, dtype=torch.int32, device=device)
        self.args = (rand(tokens, geo.heads, geo.head_dim).to(DTYPE),
                     rand(tokens, geo.heads).to(DTYPE),
                     -torch.rand(geo.heads, device=device, generator=gen) - 0.5,
                     rand(tokens, geo.groups, geo.d_state).to(DTYPE),
                     rand(tokens, geo.groups, geo.d_state).to(DTYPE))  # fmt: skip
        self.kwargs = {"D": rand(geo.heads), "dt_bias": rand(geo.heads) * 0.5,
                       "has_initial_state": torch.ones(batch, dtype=torch.bool, device=device),
                       "dt_round": True}  # fmt: skip
        self.chunk_size = geo.chunk_size
        self.layout = chunk_layout(self.qsl, self.slots, geo.chunk_size, tokens)
        self.reference = self.run(ScanTiles())

    def scan(self, tiles: ScanTiles) -> torch.Tensor:
        """The whole scan, continuing from the states as they are."""
        return mamba2_chunk_scan(self.state, self.slots, self.qsl, *self.args, self.chunk_size,
                                 **self.kwargs, layout=self.layout, tiles=tiles)

    def run(self, tiles: ScanTiles) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, final states) of the whole scan from the saved states."""
        self.state.copy_(self.saved)
        out = self.scan(tiles)
        return out, self.state.clone()

    def mismatch(self, tiles: ScanTiles) -> float:
        """Relative error of a run against the default tiles' (the larger of output's and
        final states')."""
        out, final = self.run(tiles)
        return max(rel_error(out, self.reference[0]), rel_error(final, self.reference[1]))

    def launch(self, tiles: ScanTiles, kernel: str) -> Callable[[], None]:
        """``kernel``'s launch alone, after one run of the launches before it. The state
        passing updates the states in place, so repeats of it time changed values:
        the same work (the values do not steer the kernel)."""
        self.state.copy_(self.saved)
        launches, _ = chunk_scan_launches(self.state, self.slots, self.qsl, *self.args,
                                          self.chunk_size, **self.kwargs, layout=self.layout,
                                          tiles=tiles)
        for name in SCAN_KERNELS[: SCAN_KERNELS.index(kernel)]:
            launches[name]()
        return launches[kernel]


def try_candidate(kernel: str, tiles: KernelTiles, cases: Sequence[StepCase], timer: Timer,
                  geo: ScanGeometry, smem_limit: int) -> Trial:
    """Check, then time, one candidate on every step; never raises for a candidate that
    cannot compile, cannot launch or gives another result."""
    need = smem_lower_bound(kernel, tiles, geo)
    if need > smem_limit:
        return Trial(kernel, tiles, error=f"pruned: needs >= {need} B of shared memory, "
                                          f"the GPU has {smem_limit}")
    config = ScanTiles().with_kernel(kernel, tiles)
    times, worst = [], 0.0
    try:
        for case in cases:
            err = case.mismatch(config)
            worst = max(worst, err)
            if not err <= MATCH_TOLERANCE:  # NaN too
                return Trial(kernel, tiles, rel_error=err,
                             error=f"mismatch on {case.label}: rel error {err:.2e}")
            times.append(timer(case.launch(config, kernel)))
    except Exception as error:  # a compile or launch failure: record it, go on
        return Trial(kernel, tiles, error=tuning.one_line(error))
    return Trial(kernel, tiles, ms=tuple(times), rel_error=worst)


def sweep_kernel(kernel: str, geo: ScanGeometry, grid: Grid,
                 attempt: Callable[[KernelTiles], Trial], out_of_time: Callable[[], bool],
                 shipped: KernelTiles | None = None) -> tuple[list[Trial], int]:
    """Both phases of one kernel's sweep. Returns its trials and how many candidates the
    budget left untried. The default and the ``shipped`` tiles run whatever the budget:
    a sweep cut short keeps what the packaged table had."""
    first = phase_one(kernel, geo, grid, shipped)
    always = 2 if shipped is not None and shipped != first[0] else 1
    return tuning.sweep_phases(first, lambda best: phase_two(kernel, best, grid), attempt,
                               out_of_time, always)


# -- the run -----------------------------------------------------------------------------------


def kernel_order(cases: Sequence[StepCase], timer: Timer,
                 kernels: Sequence[str] = SCAN_KERNELS) -> list[str]:
    """``kernels`` by their default time, costliest first: the budget goes to them."""
    totals = {k: sum(timer(c.launch(ScanTiles(), k)) for c in cases) for k in kernels}
    return sorted(kernels, key=lambda k: -totals[k])


class SweepProgress:
    """One geometry's progress bar (rich), and a line per kernel once it is swept."""

    def __init__(self, progress: Any, model: str, total: int) -> None:
        self.progress, self.model = progress, model
        self.task = progress.add_task(model, total=total)

    def advance(self, candidates: int) -> None:
        self.progress.advance(self.task, candidates)

    def kernel_done(self, kernel: str, trials: Sequence[Trial], skipped: int) -> None:
        best = pick_fastest(trials)
        found = f"{best.tiles.label()}, {best.total_ms:.3f} ms" if best else "nothing ran"
        self.progress.console.print(
            f"{self.model} {kernel}: {found} ({sum(t.ok for t in trials)} of {len(trials)} "
            f"candidates ran, {skipped} left untried)", soft_wrap=True)


def tune_geometry(geo: ScanGeometry, cases: Sequence[StepCase], setup: Setup,
                  deadline: float, report: SweepProgress) -> dict[str, Any]:
    """Sweep the kernels of one geometry (``setup.kernels``); returns the trials and tuned
    tiles (for a kernel not swept, or none of whose candidates ran, the packaged table's
    for this GPU, or the defaults)."""
    grid, timer = setup.grid, setup.rig.timers[0]
    trials: list[Trial] = []
    device = setup.rig.device
    shipped = tuned_tiles(geo.chunk_size, geo.head_dim, geo.d_state, DTYPE,
                          torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    tuned, skipped = shipped, 0

    def attempt(tiles: KernelTiles) -> Trial:
        trial = try_candidate(kernel, tiles, cases, timer, geo, setup.rig.smem_limit)
        report.advance(1)
        return trial

    for kernel in kernel_order(cases, timer, setup.kernels):
        kernel_trials, left = sweep_kernel(kernel, geo, grid, attempt,
                                           tuning.out_of_time(deadline), getattr(shipped, kernel))
        report.advance(left)
        report.kernel_done(kernel, kernel_trials, left)
        best = pick_fastest(kernel_trials)
        if best is not None:
            tuned = tuned.with_kernel(kernel, best.tiles)
        trials += kernel_trials
        skipped += left
    return {"trials": [t.to_dict() for t in trials], "skipped": skipped,
            "tuned": tuned.to_dict()}


def compare(cases: Sequence[StepCase], tuned: ScanTiles, timer: Timer) -> dict[str, Any]:
    """Default against tuned tiles: each kernel alone and the whole scan, per step."""
    default = ScanTiles()
    kernels = [{"kernel": k, "default": getattr(default, k).label(),
                "tuned": getattr(tuned, k).label(),
                "default_ms": [timer(c.launch(default, k)) for c in cases],
                "tuned_ms": [timer(c.launch(tuned, k)) for c in cases]} for k in SCAN_KERNELS]
    whole = []
    for case in cases:
        err = case.mismatch(tuned)
        default_ms = timer(lambda c=case: c.scan(default))
        tuned_ms = timer(lambda c=case: c.scan(tuned))
        whole.append({"step": case.label, "default_ms": default_ms, "tuned_ms": tuned_ms,
                      "speedup": default_ms / tuned_ms, "rel_error": err})
    return {"kernels": kernels, "whole": whole}


def grid_size(geo: ScanGeometry, grid: Grid, kernels: Sequence[str] = SCAN_KERNELS) -> int:
    """Candidates of a geometry's sweep of ``kernels`` (phase 2 counted around the
    defaults)."""
    return sum(len(phase_one(k, geo, grid)) + len(phase_two(k, KERNEL_TILES[k](), grid))
               for k in kernels)


@dataclass(frozen=True)
class Target:
    """What one geometry's sweep is for: a model's Mamba2 mixer and its SSM-state dtype."""

    model: str
    geometry: ScanGeometry
    state_dtype: torch.dtype


def zoo_target(model: str) -> Target:
    """A zoo model's target: its geometry and its family's default SSM-state dtype."""
    family = zoo_config(model)["model_type"]
    return Target(model, scan_geometry(model), getattr(torch, default_ssm_dtype(family)))


@dataclass(frozen=True)
class Setup:
    """How the sweep runs: where and timed how (`Rig`), on which steps, for how long,
    and which kernels it sweeps."""

    rig: Rig
    steps: tuple[tuple[int, int], ...]
    budget_s: float
    grid: Grid = Grid()
    kernels: tuple[str, ...] = SCAN_KERNELS


def sweep_target(target: Target, setup: Setup, deadline: float,
                 report: SweepProgress) -> dict[str, Any]:
    """One geometry: its sweep, then default against tuned tiles."""
    device = setup.rig.device
    gen = torch.Generator(device=device).manual_seed(0)
    geo = target.geometry
    cases = [StepCase(geo, b, n, target.state_dtype, device, gen) for b, n in setup.steps]
    swept = tune_geometry(geo, cases, setup, deadline, report)
    tuned = ScanTiles.from_dict(swept["tuned"])
    return {"model": target.model, "geometry": dataclasses.asdict(geo),
            "dtype": dtype_name(DTYPE), "state_dtype": dtype_name(target.state_dtype),
            "steps": [c.label for c in cases], "swept": list(setup.kernels), **swept,
            **compare(cases, tuned, setup.rig.timers[1])}


def run(targets: Sequence[Target], setup: Setup, argv: Sequence[str]) -> dict[str, Any]:
    """The sweep over every target, with a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import Progress

    start = time.perf_counter()
    results = []
    with Progress(console=Console(stderr=True)) as progress:
        for index, target in enumerate(targets):
            deadline = tuning.deadline(start, setup.budget_s, index, len(targets))
            report = SweepProgress(progress, target.model,
                                   grid_size(target.geometry, setup.grid, setup.kernels))
            results.append(sweep_target(target, setup, deadline, report))
    return tuning.sweep_result("scan_tune", setup, argv, MATCH_TOLERANCE, start, results)


# -- the tuned table ---------------------------------------------------------------------------


ABOUT = ("Launch tiles of the chunked Mamba2 scan per GPU name and (chunk_size, head_dim, "
         "d_state, dtype), written by benchmarks/scan_tune.py; a GPU or shape not listed gets "
         "the defaults.")
# keyed by (chunk_size, head_dim, d_state, dtype); each entry's speed-ups are the whole scan's
TABLE = tuning.TunedTableFile(TUNED_TABLE, ABOUT, ("chunk_size", "head_dim", "d_state", "dtype"),
                              "whole", parse_tuned_table)


# -- from the command line -------------------------------------------------------------------


def setup_for(args: argparse.Namespace) -> tuple[list[Target], Setup]:
    """What to sweep and how, from the arguments.

    Raises:
        ValueError: an unknown model or kernel, no CUDA GPU (or, with ``--smoke``, not under
            Triton's interpreter).
    """
    unknown = sorted(set(args.kernels or ()) - set(SCAN_KERNELS))
    if unknown:
        raise ValueError(f"--kernels {' '.join(unknown)}: the scan's kernels are "
                         f"{', '.join(SCAN_KERNELS)}")
    kernels = tuple(k for k in SCAN_KERNELS if args.kernels is None or k in args.kernels)
    if args.smoke:
        return [Target("smoke", SMOKE_GEOMETRY, torch.float32)], Setup(
            tuning.smoke_rig(), SMOKE_STEPS, args.budget_s, SMOKE_GRID, kernels)
    targets = [zoo_target(model) for model in args.models]  # unknown models fail first
    rig = tuning.gpu_rig(SWEEP_TIMING, FINAL_TIMING, TIMING, CALLS_PER_EVENT)
    return targets, Setup(rig, tuple(args.steps), args.budget_s, kernels=kernels)


def sweep_steps(args: argparse.Namespace, argv: Sequence[str]) -> tuning.SweepSteps:
    """The sweep's steps of `tuning.tuner_main`, for these arguments."""
    return tuning.SweepSteps(lambda: setup_for(args), lambda t, s: run(t, s, argv), TABLE.write)
