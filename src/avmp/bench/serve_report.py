"""Tables and latency plots of ``avmp bench serve`` results (`avmp.bench.loadgen`).

Two tables per result: throughput per rate (counts, request and token throughputs,
goodput) and the latency distributions per rate (mean, median and the run's
percentiles of TTFT, TPOT, ITL and E2E in ms); a run of conversations (``--multi-turn``)
adds TTFT by turn index, where a server's prefix cache shows. The plot draws each
distribution as a CDF, one line per rate, from the raw request records kept in the
JSON, and for conversations the median TTFT of each turn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from avmp.bench.files import naming
from avmp.bench.loadgen import METRICS, TRACE_RATE, load_result, metric_values_ms, records_of

METRIC_TITLES = {
    "ttft": "time to first token",
    "tpot": "time per output token",
    "itl": "inter-token latency",
    "e2e": "end-to-end latency",
}
Table = tuple[list[str], list[list[str]]]


def _number(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _load_label(entry: dict[str, Any]) -> str:
    """``4/s``, ``inf`` (all at once), ``trace`` (its own timing, ``trace x0.5`` at another
    time scale), with the burstiness and the concurrency cap when set: ``4/s k=0.5 cap 8``."""
    rate = entry["request_rate"]
    if rate == TRACE_RATE:
        scale = entry.get("time_scale") or 1.0
        label = TRACE_RATE if scale == 1.0 else f"{TRACE_RATE} x{scale:g}"
    else:
        label = "inf" if rate == "inf" else f"{rate}/s"
    if entry.get("burstiness", 1.0) != 1.0 and rate not in ("inf", TRACE_RATE):
        label += f" k={entry['burstiness']:g}"
    if entry.get("max_concurrency"):
        label += f" cap {entry['max_concurrency']}"
    return label


def throughput_table(result: dict[str, Any]) -> Table:
    """One row per rate: completed/failed, duration, throughputs and goodput."""
    headers = ["load", "done", "failed", "time s", "req/s", "in tok/s", "out tok/s", "goodput/s"]
    rows = []
    for entry in result["results"]:
        s = entry["summary"]
        rows.append(
            [
                _load_label(entry),
                str(s["completed"]),
                str(s["failed"]),
                _number(s["duration_s"], 2),
                _number(s["request_throughput"], 2),
                _number(s["input_token_throughput"]),
                _number(s["output_token_throughput"]),
                _number(s["goodput"], 2),
            ]
        )
    return headers, rows


def latency_table(result: dict[str, Any]) -> Table:
    """One row per rate and metric: mean, median and each saved percentile, in ms."""
    entries = result["results"]
    keys = list(entries[0]["summary"]["ttft_ms"]) if entries else ["mean", "median"]
    keys = [k for k in keys if k != "p50"]  # the median
    headers = ["load", "metric", *[f"{k} ms" for k in keys]]
    rows = []
    for entry in entries:
        for metric in METRICS:
            stats = entry["summary"][f"{metric}_ms"]
            rows.append(
                [_load_label(entry), metric.upper(), *[_number(stats.get(k), 2) for k in keys]]
            )
    return headers, rows


def is_multi_turn(result: dict[str, Any]) -> bool:
    return any(entry["summary"].get("turns") for entry in result["results"])


def turn_table(result: dict[str, Any]) -> Table:
    """One row per rate and turn (1: the first), then one of every later turn together:
    requests answered and failed, mean prompt tokens (the history grows) and TTFT."""
    entries = [e for e in result["results"] if e["summary"].get("turns")]
    keys = list(entries[0]["summary"]["ttft_ms"]) if entries else ["mean", "median"]
    keys = keys[:2] + [k for k in keys[2:] if k != "p50"][-1:]  # mean, median, the highest
    headers = ["load", "turn", "done", "failed", "prompt tok", "TTFT mean ms",
               *[f"{k} ms" for k in keys[1:]]]  # fmt: skip
    rows = []
    for entry in entries:
        turns = entry["summary"]["turns"]
        for row in turns["by_turn"]:
            counts = [str(row["completed"]), str(row["failed"]), _number(row["prompt_tokens_mean"])]
            stats = [_number(row["ttft_ms"].get(k), 2) for k in keys]
            rows.append([_load_label(entry), str(row["turn"] + 1), *counts, *stats])
        later = [row for row in turns["by_turn"] if row["turn"]]
        if later:
            done, failed = (sum(row[k] for row in later) for k in ("completed", "failed"))
            stats = [_number(turns["ttft_later_turns_ms"].get(k), 2) for k in keys]
            rows.append([_load_label(entry), "2+", str(done), str(failed), "", *stats])
    return headers, rows


def markdown_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(result: dict[str, Any]) -> None:
    """Both tables on the terminal (rich), with the conditions above them."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    console.print(conditions(result))
    for title, (headers, rows) in _tables(result):
        table = RichTable(title=title)
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for entry in result["results"]:
        for error in entry["summary"]["errors"]:
            console.print(
                f"{_load_label(entry)}: {error['count']} x {error['message']}", markup=False
            )


def _tables(result: dict[str, Any]) -> list[tuple[str, Table]]:
    """The tables of a result with their titles, TTFT by turn for conversations."""
    tables = [("throughput", throughput_table(result)), ("latency", latency_table(result))]
    if is_multi_turn(result):
        tables.append(("TTFT by turn", turn_table(result)))
    return tables


def conditions(result: dict[str, Any]) -> str:
    """Server, model, endpoint, requests (or conversations) and date in one line."""
    settings = result.get("settings", {})
    load = f"{settings.get('num_prompts', '?')} requests per rate"
    multi_turn = settings.get("multi_turn")
    if multi_turn:
        turns = ", ".join(str(n) for n in multi_turn["turns"])
        load = (
            f"{settings.get('num_prompts', '?')} conversations ({turns} turns) per rate, "
            f"think time {multi_turn['think_time_s']:g} s"
        )
    return (
        f"{result.get('url', '?')} model {result.get('model', '?')}, "
        f"{settings.get('endpoint', '?')} endpoint, {settings.get('dataset', '?')}, "
        f"{load}, {result.get('date', '?')}"
    )


def latency_png(result: dict[str, Any]) -> bytes:
    """CDFs of TTFT, TPOT, ITL and E2E (ms), one line per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_panels = len(METRICS) + is_multi_turn(result)
    fig, axes = plt.subplots(1, num_panels, figsize=(4.2 * num_panels, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], METRICS, strict=False):
        _draw_cdf(ax, result, metric)
    axes[0][0].set_ylabel("share of requests (ITL: of gaps)")
    axes[0][len(METRICS) - 1].legend(fontsize=8, loc="lower right")
    if is_multi_turn(result):
        _draw_ttft_by_turn(axes[0][-1], result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _draw_cdf(ax: Any, result: dict[str, Any], metric: str) -> None:
    """One metric's CDF per rate, on a log scale only where its values span more than
    two decades: a log axis over less has at most one labelled tick (a power of ten)."""
    import numpy as np

    lowest, highest = math.inf, 0.0
    for entry in result["results"]:
        values = np.sort(metric_values_ms(records_of(entry), metric))
        if values.size and values[-1] > 0:
            share = np.arange(1, values.size + 1) / values.size
            ax.step(values, share, where="post", label=_load_label(entry))
            lowest, highest = min(lowest, float(values[0])), max(highest, float(values[-1]))
    if highest > 100 * lowest:  # a zero (a gap of 0 ms) counts as wide: symlog shows it
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_title(f"{metric.upper()}: {METRIC_TITLES[metric]}", fontsize=10)
    ax.set_xlabel("ms")
    ax.grid(alpha=0.3)


def _draw_ttft_by_turn(ax: Any, result: dict[str, Any]) -> None:
    """Median TTFT of each turn (1: the first), one line per rate."""
    for entry in result["results"]:
        turns = entry["summary"].get("turns") or {"by_turn": []}
        points = [(row["turn"] + 1, row["ttft_ms"]["median"]) for row in turns["by_turn"]]
        points = [(turn, ms) for turn, ms in points if ms is not None and not math.isnan(ms)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=_load_label(entry))
    ax.set_title("TTFT by turn (median)", fontsize=10)
    ax.set_xlabel("turn (1: the first)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_latency_report(path: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.latency.png`` and a self-contained ``<stem>.html`` (conditions,
    both tables, the plot) beside the result file ``path``.

    Raises:
        FileNotFoundError: no such file; ValueError: not a result.
    """
    path = Path(path)
    result = load_result(path)
    png = latency_png(result)
    png_path = path.with_name(f"{path.stem}.latency.png")
    html_path = path.with_name(f"{path.stem}.html")
    _write(png_path, png)
    _write(html_path, _html(result, png).encode())
    return png_path, html_path


def _write(path: Path, data: bytes) -> None:
    with naming(path):
        path.write_bytes(data)


def _html_table(table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(result: dict[str, Any], png: bytes) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    )
    command = " ".join(result.get("argv") or [])  # None: not run from the command line
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style>",
        "<title>avmp bench serve</title></head><body><h1>avmp bench serve</h1>",
        f"<p>{html.escape(conditions(result))}</p><pre>{html.escape(command)}</pre>",
        *(
            f"<h2>{title[0].upper() + title[1:]}</h2>\n{_html_table(table)}"
            for title, table in _tables(result)
        ),
        "<h2>Latency distributions</h2>",
        f"<img alt='latency CDFs' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
