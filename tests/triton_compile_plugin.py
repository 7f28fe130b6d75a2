"""A pytest plugin (``-p triton_compile_plugin``) that logs every Triton compilation of
the run (`avmp.kernels.compile_log`) and prints, per test, the compile seconds it spent,
and at the end the kernels that compiled most. For the GPU runs where a test takes far
longer on the device than on the CPU: compiling or computing? Under Triton's interpreter
(``TRITON_INTERPRET=1``: nothing compiles) it prints the specialisation census instead:
per kernel, the keys a GPU would compile and the arguments that changed class.

``AVMP_TRITON_COMPILE_LOG=FILE`` also writes one line per compilation to FILE.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from avmp.kernels.compile_log import CompileLog, SpecialisationCensus

_LOG = CompileLog()
_CENSUS = SpecialisationCensus()
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_PER_TEST: list[tuple[str, int, float]] = []


def pytest_configure(config: pytest.Config) -> None:
    if _INTERPRETED:
        _CENSUS.install()
    else:
        _LOG.install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    before = len(_LOG.compilations)
    try:
        return (yield)
    finally:
        new = _LOG.compilations[before:]
        _PER_TEST.append((item.nodeid, len(new), sum(c.seconds for c in new)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    write = terminalreporter.write_line
    if _INTERPRETED:
        write(_CENSUS.summary())
        _CENSUS.uninstall()
        return
    write(_LOG.summary())
    for nodeid, count, seconds in sorted(_PER_TEST, key=lambda t: -t[2])[:15]:
        write(f"  {seconds:7.2f} s in {count:3d} compilations  {nodeid}")
    path = os.environ.get("AVMP_TRITON_COMPILE_LOG")
    if path:
        with open(path, "w") as f:
            f.write(_LOG.details() + "\n")
    _LOG.uninstall()
