"""What the launch-tile tuners (`scan_tune`, `attn_tune`) share, each defined once: their
timers, the two-phase sweep under a time budget, the fields their results share, the tuned
table they write (the package's entries merged with a run's), and their command line and
``main()`` flow.

What differs between them (kernels, geometries, candidates, result columns) stays in
each script; this module knows nothing of any kernel. Triton is imported only inside the
functions a sweep calls, so that a tuner's ``--markdown`` runs without it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from benchmarks.common import (
    Timer,
    event_ms,
    read_result,
    repo_path,
    tuning_device,
    wall_timer,
    warm_up_gpu,
    write_result,
)

if TYPE_CHECKING:
    import torch  # imported where a sweep runs: redrawing tables needs no torch

Result = dict[str, Any]
Tiles = TypeVar("Tiles")


class Candidate(Protocol):
    """A timed candidate of a sweep: its tiles, whether it ran, and its cost (lower is
    faster; only read where ``ok``)."""

    @property
    def tiles(self) -> Any: ...

    @property
    def ok(self) -> bool: ...

    @property
    def cost(self) -> float: ...


Trial = TypeVar("Trial", bound=Candidate)


# -- timers ---------------------------------------------------------------------------------


def cuda_timer(warmup: int, repeats: int, calls: int = 1) -> Timer:
    """Median milliseconds of one call: CUDA events around ``calls`` back-to-back calls,
    ``repeats`` times after ``warmup`` calls. A small kernel takes less time than its
    launch from Python; queued behind one another, the calls after the first hide that
    cost, as they do in a step."""

    def timer(fn: Callable[[], object]) -> float:
        def batch() -> None:
            for _ in range(calls):
                fn()

        run = fn if calls == 1 else batch  # one call: no wrapper inside the events
        return event_ms(run, repeats=repeats, warmup=max(1, warmup // calls)) / calls

    return timer


@dataclass(frozen=True)
class Rig:
    """Where a sweep runs and how it times: the device, the sweep's and the final
    comparison's timers, what they are (``timing``, for the report), and the shared
    memory one program may use."""

    device: torch.device
    timers: tuple[Timer, Timer]
    timing: str
    smem_limit: int


def smoke_rig() -> Rig:
    """The --smoke run's: the CPU under Triton's interpreter, one call timed by the wall
    clock, shared memory unbounded.

    Raises:
        ValueError: not under Triton's interpreter.
    """
    import torch
    import triton

    if not triton.knobs.runtime.interpret:
        raise ValueError("--smoke runs under Triton's interpreter: set TRITON_INTERPRET=1")
    timer = wall_timer(0, 1)
    return Rig(torch.device("cpu"), (timer, timer),
               "wall clock under Triton's interpreter, one call (not a measurement)", 1 << 30)


def gpu_rig(sweep: dict[str, int], final: dict[str, int], timing: str,
            calls: int = 1) -> Rig:
    """The CUDA GPU's, timed by `cuda_timer` with ``sweep`` and ``final``'s warmup and
    repeats.

    Raises:
        ValueError: no CUDA GPU is visible.
    """
    device, smem = tuning_device()
    return Rig(device, (cuda_timer(**sweep, calls=calls), cuda_timer(**final, calls=calls)),
               timing, smem)


# -- the sweep --------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    """An exception as one short line (Triton's compile errors span pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def pick_fastest(trials: Sequence[Trial]) -> Trial | None:
    """The trial of the least cost (the earliest of equals: the defaults come first);
    None when none ran."""
    ran = [t for t in trials if t.ok]
    return min(ran, key=lambda t: t.cost) if ran else None


def sweep_phases(first: Sequence[Tiles], around: Callable[[Tiles], Sequence[Tiles]],
                 attempt: Callable[[Tiles], Trial],
                 out_of_time: Callable[[], bool], always: int = 1) -> tuple[list[Trial], int]:
    """Phase 1's candidates ``first`` (the defaults first), then phase 2's, ``around``
    phase 1's fastest. Returns the trials and how many candidates the budget left
    untried (the first ``always`` run whatever the budget: the baseline, and the tiles
    shipped before, which a sweep cut short must not lose)."""
    trials: list[Trial] = []
    skipped = 0
    for tiles in first:
        if out_of_time() and len(trials) >= always:
            skipped += 1
            continue
        trials.append(attempt(tiles))
    best = pick_fastest(trials)
    for tiles in around(best.tiles if best else first[0]):
        if out_of_time():
            skipped += 1
            continue
        trials.append(attempt(tiles))
    return trials, skipped


def deadline(start: float, budget_s: float, index: int, count: int) -> float:
    """When the sweep of target ``index`` of ``count`` stops: its even share of the
    budget, plus what the ones before it left."""
    return start + budget_s * (index + 1) / count


def out_of_time(deadline: float) -> Callable[[], bool]:
    return lambda: time.perf_counter() > deadline


# -- results ----------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def command(script: str, argv: Sequence[str]) -> str:
    """The command as a result records it: paths relative to the repository, or their
    file names (`repo_path`)."""
    shown = [repo_path(a) if prev in ("--out", "--write-table") else a
             for prev, a in zip(["", *argv], argv, strict=False)]
    return f"PYTHONPATH=src python3 -m benchmarks.{script} " + shlex.join(shown)


class SweepSetup(Protocol):
    """What `sweep_result` and `tuner_main` read of a tuner's setup."""

    @property
    def rig(self) -> Rig: ...

    @property
    def budget_s(self) -> float: ...


def sweep_result(script: str, setup: SweepSetup, argv: Sequence[str], match_tolerance: float,
                 start: float, geometries: list[Result], extra: Result | None = None) -> Result:
    """A tuner's result: where, with what, run how, timed how, the script's ``extra``
    fields, the budget and the time taken since ``start``, then the geometries'."""
    import torch
    import triton

    rig = setup.rig
    return {"device": device_name(rig.device), "torch": torch.__version__,
            "triton": triton.__version__, "command": command(script, argv),
            "timing": rig.timing, "match_tolerance": match_tolerance, **(extra or {}),
            "budget_s": setup.budget_s, "elapsed_s": time.perf_counter() - start,
            "shared_memory_bytes": rig.smem_limit, "geometries": geometries}


# -- the tuned table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedTableFile:
    """A kernel's tuned table as its tuner writes it: the package's file (``parts`` under
    avmp/kernels/triton), what it says it is (``about``), the entry fields that key it
    beside the GPU (each a field of a result's geometry entry, or else of its
    ``geometry``), the geometry entry's rows that carry each step's speed-up, and the
    kernel's parser (which refuses a malformed table)."""

    parts: tuple[str, ...]
    about: str
    shape_fields: tuple[str, ...]
    speedup_rows: str
    parse: Callable[[Any, str], object]

    def key(self, entry: dict[str, Any]) -> tuple[Any, ...]:
        from avmp.kernels.triton._common import gpu_key

        return (gpu_key(entry["gpu"]), *(entry[f] for f in self.shape_fields))

    def packaged_entries(self) -> list[dict[str, Any]]:
        """The entries of the table in the package, as written (notes included)."""
        path = resources.files("avmp.kernels.triton").joinpath(*self.parts)
        if not path.is_file():
            return []
        return list(json.loads(path.read_text(encoding="utf-8"))["entries"])

    def entries(self, result: Result) -> list[dict[str, Any]]:
        """One entry per swept geometry of a result."""
        return [{"gpu": result["device"],
                 **{f: g[f] if f in g else g["geometry"][f] for f in self.shape_fields},
                 "tiles": g["tuned"], "command": result["command"], "model": g["model"],
                 "speedup": {s["step"]: round(s["speedup"], 3) for s in g[self.speedup_rows]}}
                for g in result["geometries"]]  # fmt: skip

    def merged(self, existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> Result:
        """``existing`` entries with those of the same GPU and shape replaced by ``new``.

        Raises:
            ValueError: two new entries for one key, or a malformed entry.
        """
        self.parse({"entries": new}, "this run")  # raises on a key twice
        replaced = {self.key(e) for e in new}
        table = {"about": self.about,
                 "entries": [e for e in existing if self.key(e) not in replaced] + new}
        self.parse(table, "the merged table")
        return table

    def write(self, path: Path, result: Result) -> None:
        """The package's table with a result's entries merged in, written to ``path``.

        Raises:
            ValueError: two geometries of the result share a key.
        """
        table = self.merged(self.packaged_entries(), self.entries(result))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")


# -- the command line -------------------------------------------------------------------------


def tuner_parser(description: str, *, models: Sequence[str], budget_s: float,
                 markdown_help: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options every tuner takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="results file to write (.json.gz: compressed)")
    parser.add_argument("--write-table", type=Path, metavar="PATH",
                        help="write the tuned table (the package's, with this run's entries)")
    parser.add_argument("--markdown", type=Path, help=markdown_help)
    parser.add_argument("--models", nargs="+", default=list(models), help="zoo models")
    parser.add_argument("--budget-s", type=float, default=budget_s,
                        help="seconds of sweeping before the candidates left are skipped")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser


@dataclass(frozen=True)
class SweepSteps:
    """A tuner's sweep, as `tuner_main` runs it: what to sweep and how (``plan``: its
    targets and a setup with a `Rig`; raises ValueError on a user mistake or without a
    GPU), the sweep itself (``run``), and the tuned table's writer."""

    plan: Callable[[], tuple[Any, Any]]
    run: Callable[[Any, Any], Result]
    write_table: Callable[[Path, Result], None]


@dataclass(frozen=True)
class TunerSteps:
    """The script's parts of `tuner_main`: the tables of a saved result (``saved``) and
    of a fresh one (``report``), and its `SweepSteps`, loaded only to sweep (``sweep``:
    they import Triton, which the tables do without)."""

    saved: Callable[[Result], str]
    report: Callable[[Result], str]
    sweep: Callable[[], SweepSteps]


def tuner_main(script: str, args: argparse.Namespace, steps: TunerSteps) -> int:
    """A tuner's run: print a saved result's tables (``--markdown``), or sweep, save the
    result (``--out``) and the tuned table (``--write-table``), then print its tables. A
    user mistake or a missing GPU prints one line and returns 2."""
    try:
        if args.markdown is not None:
            print(steps.saved(read_result(args.markdown)))
            return 0
        if args.out is None:
            raise ValueError("--out is required to run the sweep")
        sweep = steps.sweep()
        targets, setup = sweep.plan()
        if setup.rig.device.type == "cuda":
            warm_up_gpu()  # clocks up before the first timing
        result = sweep.run(targets, setup)
        write_result(args.out, result)
        if args.write_table is not None:
            sweep.write_table(args.write_table, result)
    except (ValueError, OSError) as error:  # a user mistake or a missing GPU: one line
        print(f"{script}: {error}", file=sys.stderr)
        return 2
    print(steps.report(result))
    return 0
