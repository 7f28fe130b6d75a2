"""The simulator's step-time calibration from engine runs' own steps, and how well it
predicts runs it was not fitted on.

Calibrate: every profiled step of the given engine replays (``benchmarks/engine_replay.py``
results: every layout and the unbounded run) becomes a calibration point
(`avmp.sim.calibration.fit_calibration`), optionally beside the points of an existing
calibration file (``--cells``: the cells of ``benchmarks/engine.py``)::

    python -m benchmarks.calibrate REPLAY.json.gz [REPLAY ...] --out CAL.json

A point's time is what the simulator's clock must advance by for that step: the step's
device time (CUDA events) plus the time the device then sat idle until the next step
began (waiting for the host), reconstructed from the host's start times as
benchmarks/engine.py does (`device_idle_after`); over a replay they add up to its
timeline. Steps that captured a CUDA graph are not points (one-off work, reported apart
by the replay): they give the calibration's ``graph_captures`` (`avmp.sim.calibration`), the
median cost of capturing a decode graph and a prefill or mixed graph, with their counts.
A capture's cost is its step's time as above (the device time, whose events span the
capture's own passes, plus the wait after it) less the fitted model's price of the same
step replayed (`capture_costs`), clamped at 0: the step ran its batch as well as the
capture, and the simulator prices that batch itself. The row's period (host start to the
next start) is not used: the host runs a step ahead, so a period also holds part of a
neighbouring step. A row records whether its step replayed a decode graph, which the fit uses
(`avmp.sim.calibration`: eager decode requests, graph rows); rows from before a field was
recorded (attention pairs) load without it.

A calibration is fitted in one form (``--form``, `avmp.sim.calibration.CALIBRATION_FORMS`):
``linear`` on the shape's counts, or ``physical`` on the work they mean for the model
on the GPU profile (``--profile``, by default the replays' device's), which the file
records beside the points (``form``, ``profile``). `DEFAULT_FORM` is the one whose fit
on one workload priced the other best (docs/BENCHMARKS.md).

Agreement: with two or more replays, each is resimulated (``engine_replay --resimulate``)
with a calibration fitted on its own steps (in-sample), with one fitted on the other
replays' steps alone (held-out) and with one fitted on every replay (joint), in each of
``--forms`` (both by default), and tables give per run the measured and simulated req/s,
preemptions and steps::

    python -m benchmarks.calibrate --agreement A.json.gz B.json.gz --out agreement.json
    python -m benchmarks.calibrate --markdown agreement.json

The calibrations it fits are written to ``--calibration-dir`` (default: a temporary one).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from avmp.sim.calibration import CALIBRATION_FORMS, LINEAR_FORM, PHYSICAL_FORM
from benchmarks.common import gpu_profile, read_result, repo_path, write_result

# Fields of an engine replay's step row, in order (benchmarks/engine_replay.py `replay`);
# older rows stop earlier (after the graph flags, or after the longest context).
PREFILL, DECODE, CONTEXT, REQUESTS, PERIOD, DEVICE, GRAPH, CAPTURED = range(8)
LONGEST_PREFILL, LONGEST_CONTEXT, ATTENTION_PAIRS, PADDED_TOKENS = 8, 9, 10, 11

# the form whose fit on one H200 replay priced the other's best (docs/BENCHMARKS.md, "A
# time model from the model's work")
DEFAULT_FORM = PHYSICAL_FORM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replays", nargs="*", type=Path, help="engine_replay results files")
    parser.add_argument(
        "--out", type=Path, help="calibration JSON to write; with --agreement: its results"
    )
    parser.add_argument(
        "--cells", type=Path, help="also fit the points of this calibration file (engine.py cells)"
    )
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="resimulate each replay in-sample and held-out, print the table",
    )
    parser.add_argument(
        "--calibration-dir", type=Path, help="with --agreement: keep the fitted calibrations here"
    )
    parser.add_argument("--markdown", type=Path, help="print the table of agreement results")
    parser.add_argument(
        "--form", choices=CALIBRATION_FORMS, default=DEFAULT_FORM,
        help=f"the calibration's form (default {DEFAULT_FORM})",
    )  # fmt: skip
    parser.add_argument(
        "--forms", nargs="+", choices=CALIBRATION_FORMS, default=list(CALIBRATION_FORMS),
        help="with --agreement: the forms to fit and compare (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        help="the GPU profile of the physical form (default: the replays' device's, "
        "benchmarks.common.gpu_profile)",
    )
    return parser.parse_args(argv)


# -- points ---------------------------------------------------------------------------------


def run_points(steps: list[list[Any]], captured: bool = False) -> list[dict[str, float]]:
    """One replay run's step rows as calibration points, captures dropped (see the
    module doc for the time each point gets); ``captured``: the steps that captured a
    graph instead, timed the same way."""
    from avmp.engine.profile import StepRecord
    from benchmarks.engine import device_idle_after

    starts = [0.0, *accumulate(row[PERIOD] for row in steps)]
    records = [
        StepRecord(row[PREFILL], row[DECODE], row[CONTEXT], 0, row[REQUESTS], started,
                   row[DEVICE], bool(row[GRAPH]), bool(row[CAPTURED]))
        for row, started in zip(steps, starts, strict=False)
    ]  # fmt: skip
    idle = device_idle_after(records)
    return [
        _point(row, device_s + idle_s)
        for row, device_s, idle_s in zip(steps, (r.seconds for r in records), idle, strict=True)
        if bool(row[CAPTURED]) == captured
    ]


def _point(row: list[Any], step_s: float) -> dict[str, float]:
    point = {
        "num_prefill_tokens": row[PREFILL],
        "num_decode_requests": row[DECODE],
        "num_context_tokens": row[CONTEXT],
        "num_requests": row[REQUESTS],
        "step_s": step_s,
        "device_s": row[DEVICE],
        "graph": int(bool(row[GRAPH])),
    }
    optional = {LONGEST_PREFILL: "longest_prefill_tokens",
                LONGEST_CONTEXT: "longest_context_tokens",
                ATTENTION_PAIRS: "num_attention_pairs",
                PADDED_TOKENS: "num_padded_tokens"}  # fmt: skip
    point.update({name: row[index] for index, name in optional.items() if len(row) > index})
    return point


def replay_points(results: dict[str, Any], captured: bool = False) -> list[dict[str, float]]:
    """The points of every run of an engine replay's results (each layout, then the
    unbounded run); ``captured``: its steps that captured a graph instead (maybe none).

    Raises:
        ValueError: results without step rows (a run on the CPU, or not a replay).
    """
    runs = [*results.get("runs", []), *([results["unbounded"]] if results.get("unbounded") else [])]
    points = [p for run in runs for p in run_points(run["engine"].get("steps", []), captured)]
    if not points and not captured:
        raise ValueError("the results hold no profiled engine steps (a GPU replay has them)")
    return points


def capture_costs(captures: list[dict[str, float]], model: Any) -> dict[str, dict[str, Any]]:
    """The calibration's ``graph_captures`` from the steps that captured a graph, timed
    as points: per kind (a pure decode step captured a decode graph, any other a prefill
    or mixed graph) the median of each step's time less ``model``'s price of the same
    step replayed (at least 0), and how many there were; kinds without a capture left out.
    """
    from avmp.sim.timing import DECODE_CAPTURE, MIXED_CAPTURE

    costs: dict[str, list[float]] = {DECODE_CAPTURE: [], MIXED_CAPTURE: []}
    for point in captures:
        kind = MIXED_CAPTURE if point["num_prefill_tokens"] else DECODE_CAPTURE
        costs[kind].append(max(0.0, point["step_s"] - model.step_seconds(point_shape(point))))
    return {
        kind: {"median_s": float(np.median(seconds)), "count": len(seconds)}
        for kind, seconds in costs.items()
        if seconds
    }


def read_replay(path: Path) -> dict[str, Any]:
    """An engine replay's results (raises FileNotFoundError or ValueError, one line)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {path}")
    try:
        results = read_result(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a results file: {error}") from None
    if not isinstance(results, dict) or "runs" not in results or "model" not in results:
        raise ValueError(f"{path}: not an engine_replay results file")
    return results


def calibration(
    replays: list[tuple[Path, dict[str, Any]]],
    cells: Path | None = None,
    form: str = DEFAULT_FORM,
    profile: str | None = None,
) -> dict[str, Any]:
    """A calibration file's contents from the replays' steps (and the points of the
    ``cells`` calibration file) in ``form``, checked to fit, with what the replays' graph
    captures cost (`capture_costs`, priced by that fit). The physical form records
    itself and its GPU ``profile``, by default the replays' device's.

    Raises:
        ValueError: replays of different models or GPUs, a cells file of another model,
            or points that do not fit (`avmp.sim.calibration.fit_calibration`).
    """
    from avmp.sim.calibration import fit_calibration

    models = {results["model"] for _, results in replays}
    gpus = {results["device"] for _, results in replays}
    if len(models) != 1 or len(gpus) != 1:
        raise ValueError(f"replays of one model on one GPU, got {sorted(models)} on {sorted(gpus)}")
    points = [p for _, results in replays for p in replay_points(results)]
    sources = [repo_path(path) for path, _ in replays]
    if cells is not None:
        points += _cell_points(cells, models)
        sources.append(repo_path(cells))
    (model,), (gpu,) = models, gpus
    # a linear file says no form, as those from before the forms: the same command
    # writes the same file
    physical = {"form": form, "profile": profile or gpu_profile(gpu)} if form != LINEAR_FORM else {}
    # a set that cannot fit is one line here
    fitted = fit_calibration(points, gpu, model, form, physical.get("profile"))
    captures = [p for _, results in replays for p in replay_points(results, captured=True)]
    graph_captures = capture_costs(captures, fitted)
    return {"gpu": gpu, "model": model, **physical, "sources": sources,
            **({"graph_captures": graph_captures} if graph_captures else {}),
            "points": points}  # fmt: skip


def _cell_points(path: Path, models: set[str]) -> list[dict[str, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such calibration file: {path}")
    try:
        data = json.loads(path.read_text())
        points, model = list(data["points"]), data.get("model")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a calibration file: {error}") from None
    if model is not None and model not in models:
        raise ValueError(f"{path}: calibrated for {model!r}, the replays ran {sorted(models)}")
    return [point if "graph" in point else _with_graph(point) for point in points]


def _with_graph(point: dict[str, float]) -> dict[str, float]:
    """A cell's point, which does not record whether its step replayed a decode graph,
    marked as the engine runs it: a pure decode step of at most the largest graph size
    replays a graph (benchmarks/engine.py drops the steps that captured one), any other
    runs eagerly. True of the models that capture decode graphs, which calibrations
    are made of (Granite-4.0-H, Nemotron-H), in cells measured before prefill and mixed
    steps could replay graphs (238ae36); later cells need the flag in their points."""
    from avmp.sim.timing import decode_graph_rows

    rows = decode_graph_rows(int(point["num_decode_requests"]))
    return point | {"graph": int(point["num_prefill_tokens"] == 0 and rows > 0)}


# -- agreement ------------------------------------------------------------------------------


def agreement(
    replays: list[tuple[Path, dict[str, Any]]],
    calibration_dir: Path,
    cells: Path | None = None,
    forms: tuple[str, ...] | list[str] = CALIBRATION_FORMS,
    profile: str | None = None,
) -> dict[str, Any]:
    """Each replay resimulated, in each of ``forms``, with a calibration of its own steps
    (in-sample), one of the others' steps (held-out) and one of every replay's (joint);
    per run the measured and simulated figures.

    Raises:
        ValueError: fewer than two replays, or what `calibration` and
            `benchmarks.engine_replay.resimulate` raise.
    """
    if len(replays) < 2:
        raise ValueError("--agreement needs two or more replays (one to fit, one to check)")
    calibration_dir.mkdir(parents=True, exist_ok=True)
    fitted: dict[tuple[str, str], Path] = {}  # a fit serves several rows: fit it once
    rows = []
    for form in forms:
        for index, (path, results) in enumerate(replays):
            others = replays[:index] + replays[index + 1 :]
            fits = (("in-sample", [(path, results)]), ("held-out", others), ("joint", replays))
            for fit, fitted_on in fits:
                name = "+".join(_label(p) for p, _ in fitted_on)
                if (name, form) not in fitted:
                    suffix = "" if form == LINEAR_FORM else f"_{form}"
                    cal_path = calibration_dir / f"calibration_{name}{suffix}.json"
                    cal_path.write_text(json.dumps(calibration(fitted_on, cells, form, profile)))
                    fitted[(name, form)] = cal_path
                rows += _agreement_rows(path, results, fitted[(name, form)], fit, name, form)
    return {"replays": [repo_path(p) for p, _ in replays],
            "cells": repo_path(cells) if cells else None, "forms": list(forms),
            "rows": rows}  # fmt: skip


def _label(path: Path) -> str:
    return path.name.split(".")[0]


def _agreement_rows(
    path: Path, results: dict[str, Any], cal_path: Path, fit: str, fitted_on: str, form: str
) -> list[dict[str, Any]]:
    from benchmarks.engine_replay import resimulate

    shapes: dict[str, list[Any]] = {}
    again = resimulate(results, cal_path, None, shapes)
    unbounded = again.get("unbounded")
    runs = [*again["runs"], *([unbounded] if unbounded else [])]
    rows = []
    for run in runs:
        layout = run["allocator"] if run is not unbounded else "unbounded"
        steps = run["engine"]["steps"]
        rows.append({
            "replay": _label(path),
            "layout": layout,
            "fit": fit,
            "fitted_on": fitted_on,
            "form": form,
            **{f"engine_{k}": run["engine"][k] for k in _FIGURES},
            **{f"sim_{k}": run["sim"][k] for k in _FIGURES},
            "num_alike_steps": alike_steps(steps, shapes[layout]),
            "num_recorded_steps": len(steps),
            **priced_steps(run_points(steps), cal_path),
        })  # fmt: skip
    return rows


def alike_steps(steps: list[list[Any]], shapes: list[Any]) -> int:
    """How many of the engine's steps, from the first, the simulator ran alike: the same
    prefill tokens, decode requests, context tokens and requests. Where arrivals are
    honoured the two part at the first arrival that falls in a different step."""
    alike = 0
    for row, shape in zip(steps, shapes, strict=False):
        simulated = (shape.num_prefill_tokens, shape.num_decode_requests,
                     shape.num_context_tokens, shape.num_requests)  # fmt: skip
        if tuple(row[PREFILL : REQUESTS + 1]) != simulated:
            break
        alike += 1
    return alike


_FIGURES = ("request_throughput", "num_preemptions", "num_steps")


def point_shape(point: dict[str, float]) -> Any:
    """The `BatchShape` of a calibration point from a replay (what the simulator would
    price for that step): `avmp.sim.calibration.calibration_shape`."""
    from avmp.sim.calibration import calibration_shape

    return calibration_shape(point)


_PRICED_KINDS = ("graph", "eager", "decode", "mixed")


def priced_steps(points: list[dict[str, float]], cal_path: Path) -> dict[str, float]:
    """The replay's own steps priced by a calibration against their measured time, for
    the graph steps and the eager ones, and for the pure decode steps and the prefill
    or mixed ones: the time model's error with the schedule held fixed (seconds, summed).
    """
    from avmp.sim.calibration import load_calibration

    model = load_calibration(cal_path)
    sums = {f"{kind}{end}": 0.0 for kind in _PRICED_KINDS for end in ("_s", "_predicted_s")}
    for point in points:
        predicted = model.step_seconds(point_shape(point))
        for kind in ("graph" if point.get("graph") else "eager",
                     "mixed" if point["num_prefill_tokens"] else "decode"):  # fmt: skip
            sums[f"{kind}_s"] += point["step_s"]
            sums[f"{kind}_predicted_s"] += predicted
    return sums


def markdown(result: dict[str, Any]) -> str:
    """The agreement tables: with forms (results since they were compared), per replay,
    fit and form the simulated req/s error of each layout and the priced steps' error;
    then per replay, layout and fit (and form), req/s, preemptions and steps, measured
    and simulated."""
    cells = f" and the cells of `{result['cells']}`" if result.get("cells") else ""
    with_forms = any("form" in row for row in result["rows"])
    lines = [
        f"Simulator against engine, calibrations fitted on replays' own steps{cells}: "
        "in-sample on the replay itself, held-out on the other replays alone"
        + (", joint on every replay." if with_forms else "."),
        "",
    ]
    if with_forms:
        lines += [*_summary(result["rows"]), ""]
    form_head, form_rule = ("form | ", "--- | ") if with_forms else ("", "")
    lines += [
        f"| replay | layout | fit (on) | {form_head}engine req/s | sim req/s (error) "
        "| engine preemptions | sim preemptions | engine steps | sim steps (alike) "
        "| engine's steps priced: graph / eager |",
        f"| --- | --- | --- | {form_rule}---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        measured, simulated = row["engine_request_throughput"], row["sim_request_throughput"]
        form = f"{row.get('form', LINEAR_FORM)} | " if with_forms else ""
        lines.append(
            f"| {row['replay']} | {row['layout']} | {row['fit']} ({row['fitted_on']}) | {form}"
            f"{measured:.2f} | {simulated:.2f} ({simulated / measured - 1:+.1%}) | "
            f"{row['engine_num_preemptions']} | {row['sim_num_preemptions']} | "
            f"{row['engine_num_steps']} | {row['sim_num_steps']} ({_alike(row)}) | "
            f"{_priced(row)} |"
        )
    lines += [
        "",
        "Alike: the engine's recorded steps (all but its last) that the simulator ran with "
        "the same prefill tokens, decode requests, context tokens and requests, from the "
        "first step on.",
        "",
        "Engine's steps priced: the replay's own step shapes priced by the calibration, "
        "against their measured time (device time plus the device's wait for the host), "
        "summed over the graph steps and the eager ones: the time model's error with the "
        "schedule held fixed.",
    ]
    return "\n".join(lines)


_FITS = ("in-sample", "held-out", "joint")


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per replay and fit, the forms side by side: each layout's simulated req/s against
    the engine's, and the error of the replay's own steps priced by the calibration
    (every run's steps summed: all, the pure decode ones, the prefill and mixed ones)."""
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    replays = list(dict.fromkeys(row["replay"] for row in rows))
    forms = list(dict.fromkeys(row.get("form", LINEAR_FORM) for row in rows))
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (row["replay"], row["fit"], row.get("form", LINEAR_FORM))
        groups.setdefault(key, {})[row["layout"]] = row
    lines = [
        f"| replay | fit | form | {' | '.join(layouts)} "
        "| steps priced: all / decode / prefill and mixed |",
        f"| --- | --- | --- | {'---: | ' * len(layouts)}---: |",
    ]
    order = sorted(
        groups, key=lambda k: (replays.index(k[0]), _FITS.index(k[1]), forms.index(k[2]))
    )
    for replay, fit, form in order:
        by_layout = groups[(replay, fit, form)]
        errors = [
            f"{r['sim_request_throughput'] / r['engine_request_throughput'] - 1:+.1%}"
            if (r := by_layout.get(layout)) else "-"
            for layout in layouts
        ]  # fmt: skip
        lines.append(
            f"| {replay} | {fit} | {form} | {' | '.join(errors)} "
            f"| {_priced_errors(list(by_layout.values()))} |"
        )
    return lines


def _priced_errors(rows: list[dict[str, Any]]) -> str:
    """The priced steps' errors over ``rows``: all steps, decode, prefill and mixed."""

    def total(kinds: tuple[str, ...], end: str) -> float:
        return sum(float(row.get(f"{kind}{end}", 0.0)) for row in rows for kind in kinds)

    errors = []
    for kinds in (("graph", "eager"), ("decode",), ("mixed",)):
        measured = total(kinds, "_s")
        errors.append(f"{total(kinds, '_predicted_s') / measured - 1:+.1%}" if measured else "-")
    return " / ".join(errors)


def _alike(row: dict[str, Any]) -> str:
    alike, recorded = row["num_alike_steps"], row["num_recorded_steps"]
    return "all" if alike == recorded else f"first {alike} of {recorded}"


def _priced(row: dict[str, Any]) -> str:
    errors = (
        f"{row[f'{kind}_predicted_s']:.1f} s of {row[f'{kind}_s']:.1f} "
        f"({row[f'{kind}_predicted_s'] / row[f'{kind}_s'] - 1:+.0%})"
        if row[f"{kind}_s"]
        else "-"
        for kind in ("graph", "eager")
    )
    return " / ".join(errors)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.markdown is not None:
            print(markdown(read_result(args.markdown)))
            return 0
        if not args.replays:
            raise ValueError("give engine_replay results files to fit (or --markdown FILE)")
        replays = [(path, read_replay(path)) for path in args.replays]
        if args.agreement:
            with tempfile.TemporaryDirectory() as scratch:
                result = agreement(replays, args.calibration_dir or Path(scratch), args.cells,
                                   tuple(dict.fromkeys(args.forms)), args.profile)  # fmt: skip
            if args.out is not None:
                write_result(args.out, result)
            print(markdown(result))
            return 0
        if args.out is None:
            raise ValueError("give --out CAL.json (the calibration to write)")
        payload = calibration(replays, args.cells, args.form, args.profile)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(payload).encode()
        args.out.write_bytes(gzip.compress(text, mtime=0) if args.out.suffix == ".gz" else text)
        print(f"{args.out}: {len(payload['points'])} points from {', '.join(payload['sources'])}"
              f", {args.form} form")  # fmt: skip
        for kind, cost in payload.get("graph_captures", {}).items():
            median_ms = cost["median_s"] * 1e3
            print(f"  {kind} graph captures: {cost['count']}, median {median_ms:.1f} ms")
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
