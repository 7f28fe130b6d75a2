"""The ``avmp`` command. Each subcommand lives in its own module of this package with
``add_parser(subparsers)`` and ``run(args) -> int``.

User mistakes (bad sizes, unknown models, malformed files) raise `UserError` or
`ValueError`; a file that cannot be read or written raises `OSError` (naming the path).
Each prints one line and exits with code 2, never a traceback. Output piped into a
reader that stops early (``avmp plan ... | head -1``) ends quietly with code 141, as a
process killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from avmp.units import format_bytes, parse_bytes

# Subcommand modules, in the order `avmp --help` lists them.
COMMANDS = ("plan", "bench", "replay", "report", "generate", "serve")
EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE
# The largest cache budget the commands accept, more than any one accelerator holds
# (288 GB at most today; the planner and the simulator model one device's cache).
# Their cost grows with the budget (the layouts keep per-unit state: about 5 s of CPU
# for a plan at 1 TiB, 40 s at 4 TiB), so a typo such as 100TiB gets one line, not a stall.
MAX_BUDGET_BYTES = 1 << 40


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def parse_size(flag: str, text: str) -> int:
    """A byte size given on the command line (``12GiB``), as a `UserError` naming the
    flag when it is not one."""
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise UserError(f"{flag}: {error}") from None
    except OverflowError:
        raise UserError(f"{flag}: {text!r} is too large to be a size") from None


def parse_budget(flag: str, text: str) -> int:
    """A cache budget: a size of at most `MAX_BUDGET_BYTES`."""
    budget = parse_size(flag, text)
    if budget > MAX_BUDGET_BYTES:
        raise UserError(
            f"{flag} {text} ({format_bytes(budget)}) is more than the "
            f"{format_bytes(MAX_BUDGET_BYTES)} that avmp plans and simulates (more than "
            "any one accelerator holds); give one device's cache memory, e.g. 80GiB"
        )
    return budget


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage text is one ``--help`` away."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        self.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="avmp",
        description="Asymmetric Virtual Memory Paging for hybrid Mamba/attention models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"avmp.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USER_ERROR
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (UserError, ValueError, OSError) as error:
        name = getattr(args, "command_name", args.command)  # a subcommand's own name
        print(f"avmp {name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"avmp {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The error as one line; an `OSError` names its path and says what went wrong
    (``out/cells: Not a directory``, ``cells/x.json: No space left on device``)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
        text = f"{' -> '.join(map(str, paths))}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit, after the reader has
    gone, raises nothing (the recipe of the `signal` module's documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
