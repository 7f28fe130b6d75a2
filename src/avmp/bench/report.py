"""The report of a sweep: tables and figures drawn only from its saved cells.

`write_report(DIR)` reads ``DIR/cells/*.json`` and writes ``DIR/report.md`` (figures as
PNG files beside it) and a self-contained ``DIR/report.html`` (the same figures embedded
as base64 PNG). Nothing is recomputed by simulation: a report of the same cells is the
same report. Trace files replayed as workloads are named like presets, and the
conditions say where each came from (`trace_lines`). Cells with a prefix cache are
compared only with cells of the same prefix cache (the tables gain a ``prefix cache``
column then), and get a table of their own: hits against the ideal, TTFT beside the same
cells without the cache, checkpoint bytes and evictions.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from avmp.bench.files import naming
from avmp.bench.stats import (
    AVMP,
    PHASES,
    PREFIX_OFF,
    Cell,
    RatioRow,
    aggregate,
    coord,
    load_cells,
    oom_change,
    paired_ratios,
)
from avmp.sim.metrics import SloTargets
from avmp.units import format_bytes

Table = tuple[list[str], list[list[str]]]
BASELINE_ORDER = ("unified", "static", "oracle")


def baseline_key(name: str) -> tuple[int, str]:
    """Baselines in a fixed order (vLLM, SGLang, the bound), unknown ones last."""
    order = BASELINE_ORDER.index(name) if name in BASELINE_ORDER else len(BASELINE_ORDER)
    return order, name


def _ratio_text(ratio: float, low: float, high: float) -> str:
    if math.isnan(ratio):
        return "n/a"
    if math.isnan(low):
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x [{low:.2f}, {high:.2f}]"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:+.1f}%"


def _pct_plain(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.0f}%"


def _grid_values(cells: Sequence[Cell], key: str) -> list[Any]:
    return sorted({coord(c, key) for c in cells}, key=lambda v: (str(type(v)), v))


def has_prefix_cache(cells: Sequence[Cell]) -> bool:
    """Whether any cell ran with a prefix cache (the tables then split by it)."""
    return any(coord(c, "prefix_cache") != PREFIX_OFF for c in cells)


def _by_workload(cells: Sequence[Cell]) -> tuple[str, ...]:
    """The keys a per-workload table groups by: the workload, and the prefix cache when
    some cell has one (pairs never mix prefix caches: `avmp.bench.stats.PAIR_KEYS`)."""
    return ("workload", "prefix_cache") if has_prefix_cache(cells) else ("workload",)


def _group_text(group: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return [str(group[k]) for k in keys]


def _group_headers(keys: Sequence[str]) -> list[str]:
    return [k.replace("_", " ") for k in keys]


def headline_table(cells: Sequence[Cell], slo: SloTargets | None = None) -> Table:
    """Per workload (and prefix cache, if any) and baseline: AVMP's ratios with 95% CIs of
    requests/s, of requests/s over the requests every allocator completed, of goodput
    under ``slo`` and of output tokens/s; the number of pairs, and the change in OOM
    events."""
    keys = _by_workload(cells)

    def group_of(row: RatioRow) -> tuple[Any, ...]:
        return tuple(row.group[k] for k in keys)

    requests = sorted(
        paired_ratios(cells, keys, "request_throughput"),
        key=lambda r: (group_of(r), baseline_key(r.baseline)),
    )
    others = {
        metric: {(group_of(r), r.baseline): r for r in rows}
        for metric, rows in (
            (m, paired_ratios(cells, keys, m, slo=slo))
            for m in ("common_request_throughput", "same_work_request_throughput", "goodput",
                      "output_token_throughput")  # fmt: skip
        )
    }
    headers = [
        *_group_headers(keys),
        "baseline",
        "pairs",
        "AVMP / baseline, requests/s [95% CI]",
        "requests all completed, req/s [95% CI]",
        "same requests rerun, req/s [95% CI]",
        "goodput [95% CI]",
        "output tokens/s [95% CI]",
        "OOM events vs baseline",
    ]
    rows = []
    for row in requests:
        group_cells = [c for c in cells if all(coord(c, k) == row.group[k] for k in keys)]
        pairs = f"{row.num_pairs}" + (f" (+{row.num_excluded} zero)" if row.num_excluded else "")
        derived = [_row_text(others[m][(group_of(row), row.baseline)]) for m in others]
        rows.append(
            [
                *_group_text(row.group, keys),
                row.baseline,
                pairs,
                _ratio_text(row.ratio, row.ci_low, row.ci_high),
                *derived,
                _pct(oom_change(group_cells, row.baseline)),
            ]
        )
    return headers, rows


def _row_text(row: RatioRow) -> str:
    """A ratio with its CI, saying which pairs were left out: with zero on a side (no
    request met the objectives) or without per-request data (cells saved before it was
    recorded); a row of only the latter reads plain n/a."""
    text = _ratio_text(row.ratio, row.ci_low, row.ci_high)
    left_out = []
    if row.num_excluded:
        left_out.append(f"{_pairs_text(row.num_excluded)} zero")
    if row.num_unavailable and (row.num_pairs or row.num_excluded):
        left_out.append(f"{_pairs_text(row.num_unavailable)} n/a")
    return f"{text} ({', '.join(left_out)})" if left_out else text


def _pairs_text(count: int) -> str:
    return f"{count} pair" + ("s" if count > 1 else "")


def budget_rows(cells: Sequence[Cell]) -> list[RatioRow]:
    """Request-throughput ratios per workload (and prefix cache, if any) and budget (the
    figure's data)."""
    keys = (*_by_workload(cells), "budget_bytes")
    rows = paired_ratios(cells, keys, "request_throughput")
    return sorted(rows, key=lambda r: (*(r.group[k] for k in keys), baseline_key(r.baseline)))


def budget_table(cells: Sequence[Cell]) -> Table:
    keys = _by_workload(cells)
    headers = [*_group_headers(keys), "budget", "baseline", "pairs", "AVMP / baseline [95% CI]"]
    rows = [
        [
            *_group_text(r.group, keys),
            format_bytes(r.group["budget_bytes"]),
            r.baseline,
            str(r.num_pairs),
            _ratio_text(r.ratio, r.ci_low, r.ci_high),
        ]
        for r in budget_rows(cells)
    ]
    return headers, rows


def allocator_table(cells: Sequence[Cell], slo: SloTargets | None = None) -> Table:
    """Per workload (and prefix cache, if any) and allocator: throughputs, completions,
    rejections, OOM events, latencies."""
    keys = _by_workload(cells)
    headers = [
        *_group_headers(keys),
        "allocator",
        "cells",
        "req/s",
        "req/s, requests all completed",
        "req/s, same requests rerun",
        "goodput",
        "completed",
        "rejected",
        "OOM events",
        "preemptions",
        "TTFT p50/p99 s",
        "TPOT p50/p99 ms",
        "budget in use",
    ]
    rows = []
    for a in aggregate(cells, (*keys, "allocator"), slo):
        rows.append(
            [
                *_group_text(a, keys),
                a["allocator"],
                str(a["num_cells"]),
                f"{a['mean_request_throughput']:.2f}",
                _number(a["mean_common_request_throughput"]),
                _number(a["mean_same_work_request_throughput"]),
                _number(a["mean_goodput"]),
                f"{a['mean_num_completed']:.0f}",
                f"{a['mean_num_rejected']:.0f}",
                str(a["total_oom_events"]),
                str(a["total_preemptions"]),
                f"{a['mean_ttft_p50_s']:.2f} / {a['mean_ttft_p99_s']:.2f}",
                f"{a['mean_tpot_p50_s'] * 1e3:.1f} / {a['mean_tpot_p99_s'] * 1e3:.1f}",
                _pct_plain(a["mean_cache_use"]),
            ]
        )
    return headers, rows


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


PREFIX_KEYS = ("workload", "prefix_cache", "allocator")


def prefix_table(cells: Sequence[Cell]) -> Table:
    """Per workload, prefix cache and allocator, over the cells with a prefix cache: the
    prompt tokens hit over the ideal's (every reusable token reused), summed over the
    cells; mean TTFT p50/p99 with the cache and, beside it, of the same cells without it
    where the grid has them; mean peak bytes of checkpoints held; mean evictions."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        if coord(cell, "prefix_cache") != PREFIX_OFF and cell["result"].get("prefix"):
            groups.setdefault(tuple(coord(cell, k) for k in PREFIX_KEYS), []).append(cell)
    headers = ["workload", "prefix cache", "allocator", "cells", "hit / ideal tokens",
               "TTFT p50/p99 s", "without cache", "checkpoints taken", "peak checkpoint GiB",
               "evicted checkpoints / pages"]  # fmt: skip
    rows = []
    for key in sorted(groups):
        members = groups[key]
        prefix = [c["result"]["prefix"] for c in members]
        hits, ideal = (sum(p[k] for p in prefix) for k in ("num_hit_tokens", "num_ideal_tokens"))
        rows.append([
            *map(str, key), str(len(members)),
            f"{hits:,} / {ideal:,} ({hits / ideal:.0%})" if ideal else f"{hits:,} / 0",
            _ttft_text(members), _ttft_text(_without_cache(cells, members)),
            f"{fmean(p['num_checkpoints_taken'] for p in prefix):.0f}",
            f"{fmean(p['peak_checkpoint_bytes'] for p in prefix) / (1 << 30):.2f}",
            f"{fmean(p['num_evicted_checkpoints'] for p in prefix):.0f} / "
            f"{fmean(p['num_evicted_pages'] for p in prefix):.0f}",
        ])  # fmt: skip
    return headers, rows


def _without_cache(cells: Sequence[Cell], members: Sequence[Cell]) -> list[Cell]:
    """The cells that differ from ``members`` only in having no prefix cache."""
    keys = ("workload", "model", "budget_bytes", "profile", "seed", "allocator")
    wanted = {tuple(coord(c, k) for k in keys) for c in members}
    return [c for c in cells if coord(c, "prefix_cache") == PREFIX_OFF
            and tuple(coord(c, k) for k in keys) in wanted]  # fmt: skip


def _ttft_text(cells: Sequence[Cell]) -> str:
    if not cells:
        return "n/a"
    p50 = fmean(c["result"]["ttft_p50_s"] for c in cells)
    p99 = fmean(c["result"]["ttft_p99_s"] for c in cells)
    return f"{p50:.3f} / {p99:.3f}"


def markdown_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def conditions(cells: Sequence[Cell], slo: SloTargets | None = None) -> list[str]:
    """What the cells cover and the settings they share, as bullet lines."""
    slo = slo or SloTargets()
    without = sum(1 for c in cells if "completed_requests" not in c["result"])
    sizes = sorted({(coord(c, "workload"), c["settings"]["num_requests"]) for c in cells})
    shared = sorted(
        {
            (k, str(v))
            for c in cells
            for k, v in c["settings"].items()
            if k not in ("num_requests", "trace_sha256") and v is not None
        }
    )
    return [
        f"cells: {len(cells)}",
        "allocators: " + ", ".join(map(str, _grid_values(cells, "allocator"))),
        "workloads: " + ", ".join(map(str, _grid_values(cells, "workload"))),
        "models: " + ", ".join(map(str, _grid_values(cells, "model"))),
        "budgets: " + ", ".join(format_bytes(b) for b in _grid_values(cells, "budget_bytes")),
        "GPU profiles (time model): " + ", ".join(map(str, _grid_values(cells, "profile"))),
        "seeds: " + ", ".join(map(str, _grid_values(cells, "seed"))),
        *(
            ["prefix caches: " + ", ".join(map(str, _grid_values(cells, "prefix_cache")))]
            if has_prefix_cache(cells)
            else []
        ),
        "requests per trace: " + ", ".join(f"{w} {n}" for w, n in sizes),
        *trace_lines(cells),
        "settings: " + ", ".join(f"{k} {v}" for k, v in shared),
        "statistic: geometric mean of per-pair ratios AVMP / baseline (pair = same workload, "
        "model, budget, profile, seed, prefix cache); 95% CI: paired bootstrap (scipy, "
        "percentile, 9,999 resamples, fixed seed)",
        f"goodput: requests/s that met {slo.describe()} (as vllm bench serve --goodput "
        "counts them); requests all completed: requests/s over the requests that every "
        "allocator of the pair completed, until the last of them finished; same requests "
        "rerun: where the layouts of a pair completed different requests, each replayed "
        "on only the requests all of them completed, from the same arrivals (elsewhere "
        "its own requests/s)"
        + (
            f"; {without} cells saved without per-request data: their pairs are n/a there"
            if without
            else ""
        ),
    ]


def trace_lines(cells: Sequence[Cell]) -> list[str]:
    """One line per trace file replayed as a workload (its cells' settings hold the
    digest of its requests): its name, requests, file and format, and how it was timed."""
    traces: dict[str, list[Cell]] = {}
    for cell in cells:
        if "trace_sha256" in cell["settings"]:
            traces.setdefault(coord(cell, "workload"), []).append(cell)
    return [_trace_line(name, traces[name]) for name in sorted(traces)]


def _trace_line(name: str, cells: Sequence[Cell]) -> str:
    settings = cells[0]["settings"]
    sources = sorted(
        {tuple(sorted(source.items())) for c in cells if (source := _source(c))}, key=str
    )
    where = "; ".join(trace_source_text(dict(s), settings["num_requests"]) for s in sources)
    arrival = settings.get("arrival")
    timing = "as recorded (seed 0)" if arrival is None else f"re-timed by {arrival} per seed"
    return (
        f"trace {name}: {settings['num_requests']} requests"
        f"{f' {where}' if where else ''}, digest {settings['trace_sha256'][:12]}, "
        f"replayed {timing}"
    )


def _source(cell: Cell) -> dict[str, Any] | None:
    trace = cell.get("trace")
    source = trace.get("source") if isinstance(trace, dict) else None
    return source if isinstance(source, dict) else None


def trace_source_text(source: dict[str, Any], num_requests: int) -> str:
    """Where a trace workload's ``num_requests`` came from, in words: ``(the first 40
    of 300) from data/chat.jsonl (jsonl)``."""
    total = source.get("num_file_requests")
    part = f"(the first {num_requests} of {total}) " if total and total != num_requests else ""
    return f"{part}from {source.get('file')} ({source.get('format')})"


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    png: bytes


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def ratio_figure(cells: Sequence[Cell]) -> Figure | None:
    """AVMP / baseline request throughput with 95% CI, per workload and budget."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in budget_rows(cells) if not math.isnan(r.ratio)]
    if not rows:
        return None
    baselines = sorted({r.baseline for r in rows}, key=baseline_key)
    workloads = _grid_values(cells, "workload")
    budgets = _grid_values(cells, "budget_bytes")
    fig, axes = plt.subplots(1, len(baselines), figsize=(5 * len(baselines), 4), squeeze=False)
    width = 0.8 / max(len(budgets), 1)
    for ax, baseline in zip(axes[0], baselines, strict=True):
        for j, budget in enumerate(budgets):
            xs, ys, lo, hi = [], [], [], []
            for i, workload in enumerate(workloads):
                match = [
                    r
                    for r in rows
                    if r.baseline == baseline
                    and r.group == {"workload": workload, "budget_bytes": budget}
                ]
                if match:
                    r = match[0]
                    xs.append(i + (j - (len(budgets) - 1) / 2) * width)
                    ys.append(r.ratio)
                    lo.append(r.ratio - (r.ci_low if not math.isnan(r.ci_low) else r.ratio))
                    hi.append((r.ci_high if not math.isnan(r.ci_high) else r.ratio) - r.ratio)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=format_bytes(budget))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
        ax.set_title(f"AVMP / {baseline}")
        ax.set_ylabel("request throughput ratio (95% CI)")
        ax.legend(title="budget", fontsize=7)
    fig.tight_layout()
    return Figure("ratios", "AVMP over each baseline, per workload and budget", _png(fig))


def _shift_cells(cells: Sequence[Cell]) -> tuple[Cell, Cell] | None:
    """The AVMP and static cells of `shift` to draw: first model, profile and seed, at the
    budget where static falls furthest behind AVMP (the case the figure is about)."""
    shift = [c for c in cells if coord(c, "workload") == "shift"]
    if not shift:
        return None
    fixed = {
        "model": _grid_values(shift, "model")[0],
        "profile": _grid_values(shift, "profile")[0],
        "seed": _grid_values(shift, "seed")[0],
    }
    found: dict[tuple[int, str], Cell] = {}
    for c in shift:
        if all(coord(c, k) == v for k, v in fixed.items()):
            found[(coord(c, "budget_bytes"), coord(c, "allocator"))] = c
    candidates: list[tuple[float, int, tuple[Cell, Cell]]] = []
    for budget in _grid_values(shift, "budget_bytes"):
        avmp, static = found.get((budget, AVMP)), found.get((budget, "static"))
        if avmp is not None and static is not None:
            ahead = avmp["result"]["request_throughput"] - static["result"]["request_throughput"]
            ratio = ahead / max(avmp["result"]["request_throughput"], 1e-12)
            candidates.append((-ratio, budget, (avmp, static)))
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def shift_figure(cells: Sequence[Cell]) -> Figure | None:
    """Pool capacities and use over time on `shift`: AVMP beside the static split."""
    import matplotlib.pyplot as plt

    pair = _shift_cells(cells)
    if pair is None or not all(c["result"]["timeline"] for c in pair):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], pair, strict=True):
        points = cell["result"]["timeline"]
        budget = cell["cell"]["budget_bytes"]
        times = [p["t_s"] for p in points]
        for key, label, style in (
            ("state_capacity_bytes", "state pool", "-"),
            ("kv_capacity_bytes", "KV pool", "-"),
            ("state_used_bytes", "state in use", "--"),
            ("kv_used_bytes", "KV in use", ":"),
        ):
            ax.plot(times, [p[key] / budget for p in points], ls=style, label=label)
        c = cell["cell"]
        ax.set_title(
            f"{c['allocator']} on shift ({c['model']}, {format_bytes(budget)}, "
            f"{c['profile']}, seed {c['seed']})",
            fontsize=9,
        )
        ax.set_xlabel("simulated time (s)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of the cache budget")
    fig.tight_layout()
    return Figure(
        "shift_split",
        "Pool split over time on shift: AVMP vs the static split "
        "(at the budget where static falls furthest behind)",
        _png(fig),
    )


def phase_figure(cells: Sequence[Cell]) -> Figure | None:
    """Mean simulated seconds per phase, stacked, per workload and allocator."""
    import matplotlib.pyplot as plt

    rows = aggregate(cells, ("workload", "allocator"))
    if not rows:
        return None
    labels = [f"{r['workload']}\n{r['allocator']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [
            r["mean_phase_s"][phase] if not math.isnan(r["mean_phase_s"][phase]) else 0.0
            for r in rows
        ]
        ax.bar(range(len(rows)), values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("mean simulated seconds per cell")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure("phases", "Where simulated time goes (mean per cell)", _png(fig))


def figures(cells: Sequence[Cell]) -> list[Figure]:
    """The figures, drawn from the cells of one prefix cache setting (off where the
    grid has it): a figure keyed by workload and allocator would mix them."""
    import matplotlib

    matplotlib.use("Agg")
    settings = sorted({coord(c, "prefix_cache") for c in cells}, key=lambda v: v != PREFIX_OFF)
    cells = [c for c in cells if coord(c, "prefix_cache") == settings[0]] if settings else []
    drawn = (ratio_figure(cells), shift_figure(cells), phase_figure(cells))
    return [f for f in drawn if f is not None]


def write_report(directory: str | Path, slo: SloTargets | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs in ``figures/``) and ``report.html`` from saved cells.

    Args:
        slo: the latency objectives of goodput (default: `SloTargets()`).
    """
    directory = Path(directory)
    cells = load_cells(directory)
    tables = [
        ("Headline: AVMP over each baseline", headline_table(cells, slo)),
        ("Per memory budget", budget_table(cells)),
        ("Per allocator", allocator_table(cells, slo)),
    ]
    if has_prefix_cache(cells):
        tables.append(("Prefix caching", prefix_table(cells)))
    drawn = figures(cells)
    lines = conditions(cells, slo)
    (directory / "figures").mkdir(exist_ok=True)
    for fig in drawn:
        _write(directory / "figures" / f"{fig.name}.png", fig.png)
    md_path, html_path = directory / "report.md", directory / "report.html"
    _write(md_path, _markdown(lines, tables, drawn).encode())
    _write(html_path, _html(lines, tables, drawn).encode())
    return md_path, html_path


def _write(path: Path, data: bytes) -> None:
    with naming(path):
        path.write_bytes(data)


def _markdown(lines: list[str], tables: list[tuple[str, Table]], drawn: list[Figure]) -> str:
    parts = ["# avmp evaluation report", "", "## Conditions", ""]
    parts += [f"- {line}" for line in lines]
    for title, table in tables:
        parts += ["", f"## {title}", "", markdown_table(table)]
    for fig in drawn:
        parts += ["", f"## {fig.title}", "", f"![{fig.title}](figures/{fig.name}.png)"]
    return "\n".join(parts) + "\n"


def _html(lines: list[str], tables: list[tuple[str, Table]], drawn: list[Figure]) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style>",
        "<title>avmp evaluation report</title></head><body>",
        "<h1>avmp evaluation report</h1><h2>Conditions</h2><ul>",
    ]
    parts += [f"<li>{html.escape(line)}</li>" for line in lines]
    parts.append("</ul>")
    for title, table in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(table)]
    for fig in drawn:
        data = base64.b64encode(fig.png).decode()
        parts += [
            f"<h2>{html.escape(fig.title)}</h2>",
            f"<img alt='{html.escape(fig.title)}' src='data:image/png;base64,{data}'>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
