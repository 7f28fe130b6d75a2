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

Without a GPU, `SpecialisationCensus` counts under Triton's interpreter the distinct
specialisation keys of each kernel's launches: the compilations the same work would
cost on a GPU, and which arguments changed class.

Usage: ``with CompileLog() as log: ...; print(log.summary())`` (likewise the census);
for a test run, ``python -m pytest -p triton_compile_plugin ...`` (tests/), which takes
the census under ``TRITON_INTERPRET=1`` and the log otherwise.
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
            f"Triton compilations: {len(self.compilations)}, {sum(total.values()):.1f} s in all"
        ]
        for kernel in sorted(total, key=total.__getitem__, reverse=True)[:top]:
            lines.append(f"  {total[kernel]:7.2f} s  {count[kernel]:3d} x  {kernel}")
        return "\n".join(lines)

    def details(self) -> str:
        """One line per compilation, in order: seconds, then the specialisation."""
        return "\n".join(f"{c.seconds:7.3f} s  {c.specialisation}" for c in self.compilations)


def specialisation_class(value: Any) -> tuple[Any, ...]:
    """What Triton's specialisation key sees of one launch argument: an integer's class
    (1, a multiple of 16, other; 32 or 64 bits), a tensor's dtype and whether its data is
    16-byte aligned, a float's type, a bool or None as itself, anything else by repr."""
    import torch

    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int):
        kind = 1 if value == 1 else ("16" if value % 16 == 0 else "other")
        return ("int", kind, 64 if not -(2**31) <= value < 2**31 else 32)
    if isinstance(value, float):
        return ("float",)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    return ("other", repr(value))


class SpecialisationCensus:
    """Under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU), count per kernel the
    distinct specialisation keys its launches carry: how many times a GPU would compile
    it for the same work. Nothing compiles on the CPU, so this finds a kernel compiled
    again mid-run without a GPU (an argument that changes class from step to step). The
    interpreter drops ``do_not_specialize``: an argument listed there still shows as
    varying here, though a GPU compiles it once."""

    def __init__(self) -> None:
        self.keys: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
        self.calls: dict[str, int] = defaultdict(int)
        self.names: dict[str, list[str]] = {}
        self._original: Any = None

    def __enter__(self) -> SpecialisationCensus:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def install(self) -> None:
        from triton.runtime import interpreter

        if self._original is not None:
            raise RuntimeError("this census is installed already")
        self._original = original = interpreter.InterpretedFunction.run
        census = self

        def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            census.record(fn, args, kwargs)
            return original(fn, *args, **kwargs)

        interpreter.InterpretedFunction.run = run

    def uninstall(self) -> None:
        from triton.runtime import interpreter

        if self._original is None:
            return
        interpreter.InterpretedFunction.run = self._original
        self._original = None

    def record(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = getattr(fn.fn, "__qualname__", str(fn.fn))
        launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        params = [p.name for p in getattr(fn, "params", [])]
        named = list(zip(params, args, strict=False)) + sorted(launch.items())
        self.names[name] = [n for n, _ in named]
        self.keys[name].add(tuple(specialisation_class(v) for _, v in named))
        self.calls[name] += 1

    def varying(self, name: str) -> list[str]:
        """The arguments of kernel ``name`` whose class differed between launches."""
        keys = list(self.keys[name])
        return [
            arg for i, arg in enumerate(self.names[name])
            if len({key[i] if i < len(key) else None for key in keys}) > 1
        ]  # fmt: skip

    def summary(self) -> str:
        total = sum(len(k) for k in self.keys.values())
        lines = [f"specialisations: {total} over {len(self.keys)} kernels"]
        for name in sorted(self.keys, key=lambda n: -len(self.keys[n])):
            varying = self.varying(name)
            suffix = f"  varying: {', '.join(varying)}" if varying else ""
            lines.append(
                f"  {len(self.keys[name]):3d} keys {self.calls[name]:6d} launches  {name}{suffix}"
            )
        return "\n".join(lines)
