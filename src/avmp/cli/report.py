"""``avmp report DIR``: write DIR/report.md and DIR/report.html from saved sweep cells."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the report of a sweep directory",
        description="Write DIR/report.md and a self-contained DIR/report.html from the raw "
        "cell results under DIR/cells (nothing is re-simulated).",
    )
    from avmp.cli.replay import add_slo_arguments

    parser.add_argument("directory", metavar="DIR", help="a directory written by avmp bench")
    add_slo_arguments(parser)  # goodput's objectives are applied when the report is drawn
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from avmp.bench.report import headline_table, markdown_table, write_report
    from avmp.bench.stats import load_cells
    from avmp.cli.replay import slo_targets

    slo = slo_targets(args)  # a bad objective fails before any work
    md_path, html_path = write_report(args.directory, slo)
    print(markdown_table(headline_table(load_cells(args.directory), slo)))
    print(f"\nreport: {md_path}, {html_path}")
    return 0
