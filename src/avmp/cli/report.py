"""``avmp report DIR``: write DIR/report.md and DIR/report.html from saved sweep cells.
``avmp report FILE.json``: draw the latency distributions of an ``avmp bench serve`` result
beside it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the report of a sweep directory or a bench serve result",
        description="Write DIR/report.md and a self-contained DIR/report.html from the raw "
        "cell results under DIR/cells (nothing is re-simulated). Given an avmp bench serve "
        "result (FILE.json), print its tables and write FILE.latency.png (TTFT, TPOT, ITL and "
        "end-to-end latency CDFs per rate) and FILE.html beside it.",
    )
    from avmp.cli.replay import add_slo_arguments

    parser.add_argument(
        "directory",
        metavar="PATH",
        help="a directory written by avmp bench, or a JSON file written by avmp bench serve",
    )
    add_slo_arguments(parser)  # goodput's objectives are applied when the report is drawn
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from avmp.bench.report import headline_table, markdown_table, trace_lines, write_report
    from avmp.bench.stats import load_cells
    from avmp.cli.replay import slo_targets

    path = Path(args.directory)
    if path.is_file() and path.suffix == ".json":  # other paths: a sweep, as before
        return _serve_report(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory or file")
    if not path.is_dir():
        raise ValueError(f"{path}: neither a sweep directory nor a bench serve result (.json)")
    slo = slo_targets(args)  # a bad objective fails before any work
    md_path, html_path = write_report(args.directory, slo)
    cells = load_cells(args.directory)
    print(markdown_table(headline_table(cells, slo)))
    traces = trace_lines(cells)
    if traces:
        print("\n" + "\n".join(traces))
    print(f"\nreport: {md_path}, {html_path}")
    return 0


def _serve_report(path: Path) -> int:
    """Tables and latency plots of a saved ``avmp bench serve`` result."""
    from avmp.bench.loadgen import load_result
    from avmp.bench.serve_report import print_tables, write_latency_report

    print_tables(load_result(path))
    png_path, html_path = write_latency_report(path)
    print(f"report: {png_path}, {html_path}")
    return 0
