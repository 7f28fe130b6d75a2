"""The ``avmp`` command. Each subcommand lives in its own module of this package with
``add_parser(subparsers)`` and ``run(args) -> int``.

User mistakes (bad sizes, unknown models, malformed files) raise `UserError` or
`ValueError`; they print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `avmp --help` lists them.
COMMANDS = ("plan", "bench", "replay", "report", "generate")


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avmp",
        description="Asymmetric Virtual Memory Paging for hybrid Mamba/attention models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"avmp.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"avmp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"avmp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
