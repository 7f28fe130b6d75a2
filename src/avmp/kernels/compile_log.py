"""Which Triton kernels compile, with which specialisation, and how long each took.

Triton compiles a kernel once per *specialisation*: the constexpr values, the dtypes,
and for every integer argument whether it is 1 or a multiple of 16 (and for every
pointer whether it is 16-byte aligned). An argument that changes from step to step (a
token count, a buffer's leading stride) can therefore compile the same kernel several
times, each time in the middle of a step. `CompileLog` records those compilations through
Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook`, called before a kernel that is
not in memory compiles, and `jit_post_compile_hook`, after), so a slow step can be told
apart from a compiling one. A compilation that Triton's disk cache answers still passes
through both hooks and shows as a short one.

Usage: ``with CompileLog() as log: ...; print(log.summary())``; the test suite installs
one for the whole run when ``AVMP_TRITON_COMPILE_LOG`` names a file.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Compilation:
    """One kernel specialisation compiled (or loaded from Triton's disk cache)."""

    kernel: str
    seconds: float
    specialisation: str


class CompileLog:
    """Records every Triton compilation while installed (one at a time per process)."""

    def __init__(self) -> None:
        self.compilations: list[Compilation] = []
        self._started: dict[str, float] = {}
        self._previous: tuple[Any, Any] | None = None

    def __enter__(self) -> CompileLog:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def install(self) -> None:
        from triton import knobs

        if self._previous is not None:
            raise RuntimeError("this CompileLog is installed already")
        runtime = knobs.runtime
        self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook = self._before
        runtime.jit_post_compile_hook = self._after

    def uninstall(self) -> None:
        from triton import knobs

        if self._previous is None:
            return
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._previous
        self._previous = None

    def _before(self, *, repr: str, **_: Any) -> bool:  # noqa: A002 (Triton's keyword)
        self._started[repr] = time.perf_counter()
        return False  # go on and compile

    def _after(self, *, repr: str, fn: Any, **_: Any) -> None:  # noqa: A002
        started = self._started.pop(repr, None)
        seconds = 0.0 if started is None else time.perf_counter() - started
        self.compilations.append(Compilation(fn.name, seconds, repr))

    def summary(self, top: int = 20) -> str:
        """Per kernel: how many specialisations compiled and their total seconds,
        slowest first."""
        count: dict[str, int] = defaultdict(int)
        total: dict[str, float] = defaultdict(float)
        for c in self.compilations:
            count[c.kernel] += 1
            total[c.kernel] += c.seconds
        lines = [
            f"Triton compilations: {len(self.compilations)}, "
            f"{sum(total.values()):.1f} s in all"
        ]
        for kernel in sorted(total, key=total.__getitem__, reverse=True)[:top]:
            lines.append(f"  {total[kernel]:7.2f} s  {count[kernel]:3d} x  {kernel}")
        return "\n".join(lines)

    def details(self) -> str:
        """One line per compilation, in order: seconds, then the specialisation."""
        return "\n".join(f"{c.seconds:7.3f} s  {c.specialisation}" for c in self.compilations)
